//! Real code systems' values (public code lists) used to make synthetic records look clinical.

pub const GIVEN_F: &[&str] = &[
    "Ava", "Maria", "Olivia", "Grace", "Amara", "Sofia", "Hannah", "Leila", "Mei", "Ruth",
];
pub const GIVEN_M: &[&str] = &[
    "Liam", "Noah", "Mateo", "Ethan", "Kwame", "Omar", "Lucas", "Arjun", "Samuel", "Wei",
];
pub const FAMILY: &[&str] = &[
    "Smith",
    "Garcia",
    "Nguyen",
    "Okafor",
    "Kowalski",
    "Haddad",
    "Johansson",
    "Patel",
    "Rossi",
    "Kim",
    "Mensah",
    "Dubois",
];

/// ICD-10-CM codes and descriptions.
pub const ICD10: &[(&str, &str)] = &[
    ("E11.9", "Type 2 diabetes mellitus without complications"),
    ("I10", "Essential (primary) hypertension"),
    ("J45.909", "Unspecified asthma, uncomplicated"),
    ("E78.5", "Hyperlipidemia, unspecified"),
    ("J06.9", "Acute upper respiratory infection, unspecified"),
    ("M54.50", "Low back pain, unspecified"),
    (
        "F32.9",
        "Major depressive disorder, single episode, unspecified",
    ),
    ("N39.0", "Urinary tract infection, site not specified"),
    (
        "K21.9",
        "Gastro-esophageal reflux disease without esophagitis",
    ),
    ("I48.91", "Unspecified atrial fibrillation"),
    ("J18.9", "Pneumonia, unspecified organism"),
    (
        "Z00.00",
        "Encounter for general adult medical examination without abnormal findings",
    ),
    (
        "S52.501A",
        "Unspecified fracture of the lower end of right radius, initial encounter",
    ),
    ("O80", "Encounter for full-term uncomplicated delivery"),
];

/// RxNorm codes, names, doses.
pub const RXNORM: &[(&str, &str, &str)] = &[
    (
        "860975",
        "metformin hydrochloride 500 MG Extended Release Oral Tablet",
        "500 mg twice daily",
    ),
    ("197361", "amlodipine 5 MG Oral Tablet", "5 mg daily"),
    ("314076", "lisinopril 10 MG Oral Tablet", "10 mg daily"),
    (
        "617312",
        "atorvastatin 10 MG Oral Tablet",
        "10 mg at bedtime",
    ),
    (
        "895994",
        "fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler",
        "2 puffs twice daily",
    ),
    (
        "313782",
        "acetaminophen 325 MG Oral Tablet",
        "650 mg as needed",
    ),
    ("310965", "ibuprofen 200 MG Oral Tablet", "400 mg as needed"),
    ("855332", "warfarin sodium 5 MG Oral Tablet", "5 mg daily"),
    ("312961", "simvastatin 20 MG Oral Tablet", "20 mg daily"),
    ("198211", "simvastatin 40 MG Oral Tablet", "40 mg daily"),
    ("308136", "amlodipine 2.5 MG Oral Tablet", "2.5 mg daily"),
    (
        "966529",
        "levothyroxine sodium 0.1 MG Oral Tablet",
        "100 mcg daily",
    ),
];

/// LOINC codes, names, UCUM units, plausible range.
pub const LOINC: &[(&str, &str, &str, f64, f64)] = &[
    (
        "2345-7",
        "Glucose [Mass/volume] in Serum or Plasma",
        "mg/dL",
        60.0,
        250.0,
    ),
    (
        "4548-4",
        "Hemoglobin A1c/Hemoglobin.total in Blood",
        "%",
        4.5,
        11.0,
    ),
    (
        "2160-0",
        "Creatinine [Mass/volume] in Serum or Plasma",
        "mg/dL",
        0.5,
        2.5,
    ),
    (
        "718-7",
        "Hemoglobin [Mass/volume] in Blood",
        "g/dL",
        9.0,
        17.5,
    ),
    (
        "2093-3",
        "Cholesterol [Mass/volume] in Serum or Plasma",
        "mg/dL",
        120.0,
        300.0,
    ),
    ("8480-6", "Systolic blood pressure", "mm[Hg]", 95.0, 180.0),
    ("29463-7", "Body weight", "kg", 3.0, 140.0),
    (
        "6690-2",
        "Leukocytes [#/volume] in Blood by Automated count",
        "10*3/uL",
        3.0,
        15.0,
    ),
    (
        "2951-2",
        "Sodium [Moles/volume] in Serum or Plasma",
        "mmol/L",
        130.0,
        148.0,
    ),
    (
        "2823-3",
        "Potassium [Moles/volume] in Serum or Plasma",
        "mmol/L",
        3.2,
        5.4,
    ),
];

/// CPT codes.
pub const CPT: &[&str] = &[
    "99213", "99214", "99203", "80053", "85025", "93000", "71046", "36415", "90471",
];

/// Allergens and reactions.
pub const ALLERGENS: &[(&str, &str)] = &[
    ("Penicillin", "Hives"),
    ("Peanut", "Anaphylaxis"),
    ("Latex", "Contact dermatitis"),
    ("Sulfonamide", "Rash"),
    ("Shellfish", "Swelling"),
    ("Codeine", "Nausea"),
];

/// Document titles and MIME types.
pub const DOCUMENT_KINDS: &[(&str, &str)] = &[
    ("Discharge summary", "application/pdf"),
    ("Referral letter", "application/pdf"),
    ("Scanned consent form", "image/jpeg"),
    ("Outside records", "application/pdf"),
    ("Transcribed dictation", "text/plain"),
];

/// Sentences for notes.
pub const NOTE_SENTENCES: &[&str] = &[
    "Vital signs stable.",
    "No acute distress.",
    "Lungs clear to auscultation bilaterally.",
    "Continue current medications.",
    "Follow up in three months.",
    "Labs reviewed with patient.",
    "Reports improved sleep.",
    "Denies chest pain or shortness of breath.",
    "Counseled on diet and exercise.",
    "Blood pressure above goal; titrate therapy.",
    "Wound healing well without signs of infection.",
    "Referred to physical therapy.",
];
