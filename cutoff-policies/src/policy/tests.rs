use super::*;
use chrono::Utc;
use proptest::prelude::*;

fn d(y: i32, m: u32, day: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, day).unwrap()
}

const POLICY: &str = r#"
version = "t-1"
as_of = "2026-01-01"
[patients]
table = "patients"
birth_date = "birth_date"
deceased_date = "deceased_date"
[defaults]
archive_after = "5y"
patient_inactive_after = "3y"
retention = "10y"
minor_retention = "5y"
[tables.patients]
tier = "operational"
[tables.mpi]
permanent = true
[tables.medications]
current_when = { column = "status", values = ["active"] }
"#;

fn tables() -> Vec<(&'static str, &'static [&'static str])> {
    vec![
        ("patients", &["id", "birth_date", "deceased_date"][..]),
        ("medications", &["id", "status"][..]),
        ("labs", &["id", "code"][..]),
        ("mpi", &["id"][..]),
    ]
}

fn policy() -> Policy {
    PolicyConfig::parse(POLICY)
        .unwrap()
        .build(&tables())
        .unwrap()
}

#[test]
fn patient_facts_are_needed_unless_every_table_is_pinned() {
    let p = policy();
    assert!(!p.needs_patient_facts(["patients"]));
    assert!(p.needs_patient_facts(["patients", "labs"]));
    assert!(p.needs_patient_facts(["mpi"]));
    assert!(!p.needs_patient_facts([]));
    assert!(!p.may_archive("patients"));
    assert!(p.may_archive("labs"));
}

fn facts<'a>(
    date: DateFact,
    last: Option<NaiveDate>,
    columns: &'a [Option<String>],
) -> RecordFacts<'a> {
    RecordFacts {
        record_date: date,
        patient: Some("p1"),
        patient_facts: PatientFacts {
            last_activity: last,
            birth_date: Some(d(1970, 1, 1)),
            deceased_date: None,
        },
        columns,
    }
}

#[test]
fn precedence_and_reasons() {
    let p = policy();
    let old = DateFact::Valid(d(2018, 1, 1));
    let active = [Some("Active".to_string())];
    let stopped = [Some("stopped".to_string())];
    let status = vec!["status".to_string()];
    let none: Vec<String> = vec![];
    let cases: Vec<(&str, RecordFacts, &Vec<String>, Tier, Reason)> = vec![
        (
            "patients",
            facts(old, Some(d(2018, 1, 1)), &[]),
            &none,
            Tier::Operational,
            Reason::TablePinned,
        ),
        (
            "medications",
            facts(old, Some(d(2018, 1, 1)), &active),
            &status,
            Tier::Operational,
            Reason::ClinicallyCurrent,
        ),
        (
            "medications",
            facts(old, Some(d(2018, 1, 1)), &stopped),
            &status,
            Tier::Archive,
            Reason::AgedOut,
        ),
        (
            "labs",
            facts(DateFact::Missing, None, &[]),
            &none,
            Tier::Operational,
            Reason::DateMissing,
        ),
        (
            "labs",
            facts(p.date_fact(Some(d(1900, 1, 1))), None, &[]),
            &none,
            Tier::Operational,
            Reason::DatePlaceholder,
        ),
        (
            "labs",
            facts(p.date_fact(Some(d(2030, 1, 1))), None, &[]),
            &none,
            Tier::Operational,
            Reason::DateInFuture,
        ),
        (
            "labs",
            facts(DateFact::Valid(d(2023, 1, 1)), None, &[]),
            &none,
            Tier::Operational,
            Reason::RecordRecent,
        ),
        (
            "labs",
            facts(old, Some(d(2024, 6, 1)), &[]),
            &none,
            Tier::Operational,
            Reason::PatientActive,
        ),
        (
            "labs",
            facts(old, Some(d(2022, 6, 1)), &[]),
            &none,
            Tier::Archive,
            Reason::AgedOut,
        ),
        (
            "labs",
            facts(DateFact::Valid(d(2010, 1, 1)), Some(d(2012, 6, 1)), &[]),
            &none,
            Tier::Purge,
            Reason::RetentionExpired,
        ),
        (
            "mpi",
            facts(DateFact::Valid(d(2010, 1, 1)), Some(d(2012, 6, 1)), &[]),
            &none,
            Tier::Archive,
            Reason::AgedOut,
        ),
    ];
    for (table, f, extra, tier, reason) in cases {
        let got = p.decide(table, &f, extra);
        assert_eq!((got.tier, got.reason), (tier, reason), "{table} {f:?}");
    }
}

#[test]
fn minors_are_kept_until_majority_plus_n_years() {
    let p = policy();
    // Born 2000: majority 2018, kept until 2023 at least; last activity 2008 + 10y = 2018.
    let mut f = facts(DateFact::Valid(d(2005, 3, 1)), Some(d(2008, 1, 1)), &[]);
    f.patient_facts.birth_date = Some(d(2000, 1, 1));
    assert_eq!(
        p.decide("labs", &f, &[]).tier,
        Tier::Purge,
        "2023 is before 2026"
    );
    f.patient_facts.birth_date = Some(d(2004, 1, 1));
    let (decision, steps) = p.explain("labs", &f, &[]);
    assert_eq!(decision.tier, Tier::Archive, "{steps:#?}");
    assert!(
        steps.iter().any(|s| s.contains("runs until 2027-01-01")),
        "{steps:#?}"
    );
}

#[test]
fn holds_stop_purges_only() {
    let holds = vec![
        LegalHold {
            id: "H1".into(),
            scope: HoldScope::Patient("p1".into()),
        },
        LegalHold {
            id: "H2".into(),
            scope: HoldScope::Filter {
                table: "labs".into(),
                column: "code".into(),
                value: "X".into(),
            },
        },
    ];
    let p = policy().with_holds(holds);
    let expired = facts(DateFact::Valid(d(2010, 1, 1)), Some(d(2012, 6, 1)), &[]);
    let got = p.decide("labs", &expired, &[]);
    assert_eq!(
        (got.tier, got.reason, got.held),
        (Tier::Archive, Reason::LegalHold, true)
    );
    let mut other = expired;
    other.patient = Some("p2");
    let code = vec!["code".to_string()];
    let x = [Some("X".to_string())];
    let y = [Some("Y".to_string())];
    other.columns = &x;
    assert!(p.decide("labs", &other, &code).held);
    other.columns = &y;
    assert_eq!(p.decide("labs", &other, &code).tier, Tier::Purge);
}

#[test]
fn rejects_every_problem_at_once_with_lines() {
    let text = r#"version = "t"
[defaults]
archive_after = "5y"
patient_inactive_after = "3y"
minor_retention = "5y"

[tables.nope]
tier = "archive"

[tables.medications]
tier = "operational"
current_when = { column = "state", values = [] }

[tables.mpi]
permanent = true
retention = "1y"

[tables.labs]
tier = "purge"
"#;
    let err = PolicyConfig::parse(text)
        .unwrap()
        .build(&tables())
        .unwrap_err();
    let PolicyError::Invalid { problems } = err else {
        panic!("{err}")
    };
    let lines: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    for expected in [
        "line 2: [defaults]: minor_retention needs [patients] birth_date",
        "line 2: [defaults]: minor_retention and deceased_retention adjust `retention`",
        "line 7: [tables.nope]: no such table",
        "line 10: [tables.medications] current_when: no column \"state\"",
        "line 10: [tables.medications] current_when: `values` is empty",
        "line 10: [tables.medications]: `tier` pins every record",
        "line 14: [tables.mpi]: `permanent` conflicts with a retention rule",
        "line 18: [tables.labs] tier: a whole table cannot be pinned to purge",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(expected)),
            "missing {expected:?} in {lines:#?}"
        );
    }
    assert_eq!(lines.len(), 8, "{lines:#?}");
}

#[test]
fn rejects_malformed_documents() {
    let base =
        "version = \"x\"\n[defaults]\narchive_after = \"5y\"\npatient_inactive_after = \"3y\"\n";
    for bad in [
        "version = 1".to_string(),
        base.replace("\"5y\"", "\"5 years\""),
        format!("{base}unknown = 1"),
        format!("{base}[tables.t]\ntier = \"cold\""),
        format!("{base}[tables.t]\nretention = \"ten years\""),
    ] {
        let err = PolicyConfig::parse(&bad).unwrap_err();
        assert!(err.to_string().contains("line"), "no line in {err}");
    }
    let tz = PolicyConfig::parse(&format!("timezone = \"Mars/Olympus\"\n{base}")).unwrap();
    assert!(tz.build(&tables()).is_err());
    let tz = PolicyConfig::parse(&format!("timezone = \"-05:00\"\n{base}"))
        .unwrap()
        .build(&tables())
        .unwrap();
    let late = chrono::DateTime::parse_from_rfc3339("2026-01-01T03:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    assert_eq!(tz.local_date(late), d(2025, 12, 31));
}

// Property tests: random policies, facts and dates.

fn duration() -> impl Strategy<Value = PolicyDuration> {
    (0u32..15, 0u32..12, 0u32..40).prop_map(|(years, months, days)| PolicyDuration {
        years,
        months,
        days,
    })
}

fn date() -> impl Strategy<Value = NaiveDate> {
    (0i64..(40 * 366)).prop_map(|n| d(1995, 1, 1) + chrono::Duration::days(n))
}

fn any_policy() -> impl Strategy<Value = (Policy, Vec<LegalHold>)> {
    (
        duration(),
        duration(),
        proptest::option::of(duration()),
        proptest::option::of(duration()),
        proptest::option::of(duration()),
        proptest::option::of(duration()),
        any::<bool>(),
        proptest::option::of(prop_oneof![Just(Tier::Operational), Just(Tier::Archive)]),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                archive_after,
                inactive,
                chart,
                retention,
                minor,
                deceased,
                permanent,
                pinned,
                undated_archive,
                hold_patient,
            )| {
                let holds = if hold_patient {
                    vec![LegalHold {
                        id: "H".into(),
                        scope: HoldScope::Patient("p".into()),
                    }]
                } else {
                    vec![]
                };
                // Build without validation: property tests also cover combinations `check` rejects.
                let policy = Policy {
                    version: "prop".into(),
                    hash: String::new(),
                    as_of: None,
                    timezone: FixedOffset::east_opt(0).unwrap(),
                    undated: if undated_archive {
                        Tier::Archive
                    } else {
                        Tier::Operational
                    },
                    majority: 18,
                    defaults: CompiledRules {
                        pinned: None,
                        permanent: false,
                        archive_after,
                        inactive_after: inactive,
                        keep_chart: chart,
                        retention,
                        minor_retention: minor,
                        deceased_retention: deceased,
                        current_values: None,
                    },
                    tables: HashMap::from([(
                        "t".to_string(),
                        CompiledRules {
                            pinned,
                            permanent,
                            archive_after,
                            inactive_after: inactive,
                            keep_chart: chart,
                            retention,
                            minor_retention: minor,
                            deceased_retention: deceased,
                            current_values: Some(vec!["active".into()]),
                        },
                    )]),
                    holds: vec![],
                };
                (policy, holds)
            },
        )
}

#[derive(Debug, Clone)]
struct AnyRecord {
    table: &'static str,
    date: Option<NaiveDate>,
    patient: &'static str,
    facts: PatientFacts,
    status: Option<String>,
}

fn any_record() -> impl Strategy<Value = AnyRecord> {
    (
        prop_oneof![Just("t"), Just("other")],
        proptest::option::of(prop_oneof![date(), Just(d(1900, 1, 1))]),
        prop_oneof![Just("p"), Just("q")],
        proptest::option::of(date()),
        proptest::option::of(date()),
        proptest::option::of(date()),
    )
        .prop_map(|(table, date, patient, last, birth, death)| AnyRecord {
            table,
            date,
            patient,
            facts: PatientFacts {
                last_activity: last,
                birth_date: birth.map(|b| b - chrono::Duration::days(20 * 365)),
                deceased_date: death,
            },
            status: None,
        })
        .prop_flat_map(|r| {
            proptest::option::of(prop_oneof![
                Just("active".to_string()),
                Just("stopped".to_string())
            ])
            .prop_map(move |s| AnyRecord {
                status: s,
                ..r.clone()
            })
        })
}

fn decide_at(policy: &Policy, r: &AnyRecord, as_of: NaiveDate) -> Decision {
    let p = policy.clone().with_as_of(as_of);
    let columns = [r.status.clone()];
    let extra = vec!["status".to_string()];
    let facts = RecordFacts {
        record_date: p.date_fact(r.date),
        patient: Some(r.patient),
        patient_facts: r.facts,
        columns: if r.table == "t" { &columns } else { &[] },
    };
    p.decide(r.table, &facts, if r.table == "t" { &extra } else { &[] })
}

proptest! {
    #[test]
    fn every_record_gets_exactly_one_tier_deterministically((policy, holds) in any_policy(), r in any_record(), as_of in date()) {
        let policy = policy.with_holds(holds);
        let first = decide_at(&policy, &r, as_of);
        prop_assert!(Tier::ALL.contains(&first.tier));
        prop_assert_eq!(first, decide_at(&policy, &r, as_of));
    }

    #[test]
    fn a_hold_is_never_overridden((policy, _) in any_policy(), r in any_record(), as_of in date()) {
        let hold = LegalHold { id: "H".into(), scope: HoldScope::Patient(r.patient.into()) };
        let held = decide_at(&policy.clone().with_holds(vec![hold]), &r, as_of);
        prop_assert!(held.held);
        prop_assert_ne!(held.tier, Tier::Purge);
        // Without the hold, the record goes to the same place unless it would have been purged.
        let free = decide_at(&policy, &r, as_of);
        if free.tier != Tier::Purge {
            prop_assert_eq!(free.tier, held.tier);
        }
    }

    #[test]
    fn a_record_leaves_the_operational_tier_only_within_its_bound((policy, holds) in any_policy(), r in any_record(), as_of in date()) {
        let policy = policy.with_holds(holds);
        let decided = decide_at(&policy, &r, as_of);
        if decided.tier != Tier::Operational {
            match policy.clone().with_as_of(as_of).leaving_operational(r.table) {
                Leaving::Never => prop_assert!(false, "{:?} left a table that never leaves", decided),
                Leaving::DatedUpTo(bound) => prop_assert!(
                    r.date.is_none_or(|d| d <= bound),
                    "{:?} dated {:?} left, after the bound {}", decided, r.date, bound
                ),
                Leaving::Any => {}
            }
        }
    }

    #[test]
    fn moving_as_of_forward_never_makes_a_record_hotter((policy, holds) in any_policy(), r in any_record(), a in date(), b in date()) {
        let policy = policy.with_holds(holds);
        let (early, late) = (a.min(b), a.max(b));
        let before = decide_at(&policy, &r, early);
        let after = decide_at(&policy, &r, late);
        prop_assert!(after.tier >= before.tier, "{:?} at {} then {:?} at {}", before, early, after, late);
    }
}
