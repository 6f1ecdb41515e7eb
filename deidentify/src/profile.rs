//! Export profiles: allow-lists of column classes, each with what happens to its values.
//!
//! A class a profile does not name is dropped, and so is a column with no class: adding a
//! column to a source table never lets it out. Two profiles are built in: `safe_harbor` (HIPAA
//! Safe Harbor, 45 CFR 164.514(b)(2)) and `limited_data_set` (164.514(e): dates shifted per
//! patient, city, state and ZIP kept, a data use agreement required). A site's own profiles may
//! start from one of them (`based_on`); [`Profile::beyond`] lists what a profile lets out that
//! another does not, so a custom profile never weakens a built-in one silently.

use crate::class::Class;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What happens to a column's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The values leave as they are.
    Keep,
    /// The column does not leave (the same as a class the profile does not name).
    Drop,
    /// Each value is replaced by a keyed pseudonym (HMAC-SHA-256 under the export's key):
    /// the same value gets the same pseudonym in every table and every export with that key.
    Pseudonym,
    /// Only the year leaves (`<column>_year`); a birth date of a patient aged 90 or over
    /// leaves as `90+`.
    Year,
    /// Dates move by a per-patient offset (keyed, 1 to 365 days either way): the same patient
    /// moves by the same days in every table and every export with that key, so intervals stay.
    Shift,
    /// The first three digits of a ZIP code, or `000` where that area holds 20,000 people or
    /// fewer.
    Zip3,
    /// Ages over 89 leave as `90+`.
    Age90,
}

impl Action {
    /// The action's name in `strata.toml`.
    pub fn name(self) -> &'static str {
        match self {
            Action::Keep => "keep",
            Action::Drop => "drop",
            Action::Pseudonym => "pseudonym",
            Action::Year => "year",
            Action::Shift => "shift",
            Action::Zip3 => "zip3",
            Action::Age90 => "age_90",
        }
    }

    fn parse(text: &str) -> Option<Action> {
        [
            Action::Keep,
            Action::Drop,
            Action::Pseudonym,
            Action::Year,
            Action::Shift,
            Action::Zip3,
            Action::Age90,
        ]
        .into_iter()
        .find(|a| a.name() == text)
    }

    /// How much of a value leaves: 0 nothing, 1 a generalised or pseudonymous form, 2 a
    /// shifted date, 3 the value itself.
    pub fn disclosure(self) -> u8 {
        match self {
            Action::Drop => 0,
            Action::Pseudonym | Action::Year | Action::Zip3 | Action::Age90 => 1,
            Action::Shift => 2,
            Action::Keep => 3,
        }
    }

    /// Why `self` cannot apply to `class`, if it cannot.
    fn refusal(self, class: Class) -> Option<&'static str> {
        match (self, class) {
            (Action::Drop, _) => None,
            (_, Class::Blob) => Some("documents never leave in an export"),
            (Action::Keep, Class::PatientKey | Class::RecordKey) => {
                Some("keys leave only as pseudonyms (or not at all)")
            }
            (Action::Year | Action::Shift, c) if !c.is_date() => {
                Some("applies to date classes only")
            }
            (Action::Zip3, c) if c != Class::Zip => Some("applies to zip only"),
            (Action::Age90, c) if c != Class::Age => Some("applies to age only"),
            _ => None,
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The name of the built-in HIPAA Safe Harbor profile.
pub const SAFE_HARBOR: &str = "safe_harbor";
/// The name of the built-in limited data set profile.
pub const LIMITED_DATA_SET: &str = "limited_data_set";

/// An export profile: which classes leave, and how.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profile {
    /// Its name.
    pub name: String,
    /// What happens to each class it lets out (a class not here is dropped).
    rules: BTreeMap<Class, Action>,
    /// The tables it may export (empty: every archived table).
    pub tables: Vec<String>,
    /// Whether a request must name a data use agreement (recorded in the audit log).
    pub requires_dua: bool,
    /// Whether it is one of the built-in profiles.
    pub built_in: bool,
}

impl Profile {
    fn new(name: &str, rules: &[(Class, Action)], requires_dua: bool) -> Profile {
        Profile {
            name: name.into(),
            rules: rules.iter().copied().collect(),
            tables: Vec::new(),
            requires_dua,
            built_in: true,
        }
    }

    /// HIPAA Safe Harbor (45 CFR 164.514(b)(2)): the 18 kinds of identifier removed; keys
    /// become keyed pseudonyms (164.514(c)); dates keep their year; ages over 89 become `90+`;
    /// ZIP codes their first three digits (`000` for small areas); state, sex, codes, values,
    /// units and categories leave. Free text and documents never do.
    pub fn safe_harbor() -> Profile {
        use Action::*;
        use Class::*;
        Profile::new(
            SAFE_HARBOR,
            &[
                (PatientKey, Pseudonym),
                (RecordKey, Pseudonym),
                (Date, Year),
                (BirthDate, Year),
                (DeathDate, Year),
                (Age, Age90),
                (Zip, Zip3),
                (State, Keep),
                (Sex, Keep),
                (Code, Keep),
                (Value, Keep),
                (Unit, Keep),
                (Category, Keep),
            ],
            false,
        )
    }

    /// A limited data set (45 CFR 164.514(e)): direct identifiers removed; dates shifted per
    /// patient by a keyed offset; ages, city, state and five-digit ZIP kept; keys become keyed
    /// pseudonyms. Free text and documents never leave. Needs a data use agreement.
    pub fn limited_data_set() -> Profile {
        use Action::*;
        use Class::*;
        Profile::new(
            LIMITED_DATA_SET,
            &[
                (PatientKey, Pseudonym),
                (RecordKey, Pseudonym),
                (Date, Shift),
                (BirthDate, Shift),
                (DeathDate, Shift),
                (Age, Keep),
                (City, Keep),
                (State, Keep),
                (Zip, Keep),
                (Sex, Keep),
                (Code, Keep),
                (Value, Keep),
                (Unit, Keep),
                (Category, Keep),
            ],
            true,
        )
    }

    /// The built-in profile named `name`.
    pub fn built_in(name: &str) -> Option<Profile> {
        match name {
            SAFE_HARBOR => Some(Profile::safe_harbor()),
            LIMITED_DATA_SET => Some(Profile::limited_data_set()),
            _ => None,
        }
    }

    /// What happens to `class` (drop when the profile does not name it).
    pub fn action(&self, class: Class) -> Action {
        self.rules.get(&class).copied().unwrap_or(Action::Drop)
    }

    /// The classes it lets out, with their actions, in class order.
    pub fn lets_out(&self) -> Vec<(Class, Action)> {
        Class::ALL
            .into_iter()
            .map(|c| (c, self.action(c)))
            .filter(|(_, a)| *a != Action::Drop)
            .collect()
    }

    /// Whether only years of dates may leave (no date class is kept or shifted).
    pub fn years_only(&self) -> bool {
        [Class::Date, Class::BirthDate, Class::DeathDate]
            .iter()
            .all(|c| self.action(*c).disclosure() <= 1)
    }

    /// What this profile lets out that `other` does not: (class, this action, other's action)
    /// wherever this discloses more.
    pub fn beyond(&self, other: &Profile) -> Vec<(Class, Action, Action)> {
        Class::ALL
            .into_iter()
            .map(|c| (c, self.action(c), other.action(c)))
            .filter(|(_, mine, theirs)| mine.disclosure() > theirs.disclosure())
            .collect()
    }
}

/// `[api.exports.profiles.<name>]` as written: an allow-list of classes.
///
/// ```toml
/// [api.exports.profiles.registry]
/// based_on = "safe_harbor"            # start from a built-in profile (optional)
/// tables = ["lab_results"]            # by default, every archived table
/// [api.exports.profiles.registry.classes]
/// category = "drop"                   # class = keep | drop | pseudonym | year | shift | zip3 | age_90
/// ```
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// A built-in profile whose rules this one starts from.
    #[serde(default)]
    pub based_on: Option<String>,
    /// What happens to each class (by name); classes not named (and not in `based_on`) are
    /// dropped.
    #[serde(default)]
    pub classes: BTreeMap<String, String>,
    /// Tables it may export (empty: every archived table).
    #[serde(default)]
    pub tables: Vec<String>,
    /// Whether a request must name a data use agreement. By default, false (true when based on
    /// `limited_data_set`).
    #[serde(default)]
    pub requires_dua: Option<bool>,
    /// The deny-list profiles' fields, refused with what to write instead.
    #[serde(default)]
    remove: Option<serde_json::Value>,
    #[serde(default)]
    identifiers: Option<serde_json::Value>,
    #[serde(default)]
    dates: Option<serde_json::Value>,
}

impl ProfileConfig {
    /// The profile named `name`; every problem, each naming the profile and what to change.
    pub fn build(&self, name: &str) -> Result<Profile, Vec<String>> {
        let at = format!("[api.exports.profiles.{name}]");
        let mut problems = Vec::new();
        let legacy: Vec<&str> = [
            ("remove", &self.remove),
            ("identifiers", &self.identifiers),
            ("dates", &self.dates),
        ]
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| *k)
        .collect();
        if !legacy.is_empty() {
            problems.push(format!(
                "{at}: {} belong to the old deny-list profiles, which let out every column they \
                 did not name (a column added to a table leaked into the next export). Profiles \
                 are now allow-lists of column classes: write [api.exports.profiles.{name}.classes] \
                 (class = \"keep\" | \"year\" | \"pseudonym\" | ...), or use the built-in \
                 \"{SAFE_HARBOR}\" or \"{LIMITED_DATA_SET}\"; see docs/exports.md",
                legacy.join(", ")
            ));
        }
        if Profile::built_in(name).is_some() {
            problems.push(format!(
                "{at}: {name} is a built-in profile and cannot be redefined; give yours another name (based_on = \"{name}\" starts from it)"
            ));
        }
        let mut profile = match &self.based_on {
            None => Profile::new(name, &[], false),
            Some(base) => match Profile::built_in(base) {
                Some(p) => p,
                None => {
                    problems.push(format!(
                        "{at} based_on: {base:?} is not a built-in profile ({SAFE_HARBOR}, {LIMITED_DATA_SET})"
                    ));
                    Profile::new(name, &[], false)
                }
            },
        };
        profile.name = name.into();
        profile.built_in = false;
        profile.tables = self.tables.clone();
        if let Some(dua) = self.requires_dua {
            profile.requires_dua = dua;
        }
        for (class_name, action_name) in &self.classes {
            let Some(class) = Class::parse(class_name) else {
                problems.push(format!(
                    "{at} classes: {class_name:?} is not a class ({})",
                    Class::names()
                ));
                continue;
            };
            let Some(action) = Action::parse(action_name) else {
                problems.push(format!(
                    "{at} classes.{class_name}: {action_name:?} is not keep, drop, pseudonym, year, shift, zip3 or age_90"
                ));
                continue;
            };
            if let Some(why) = action.refusal(class) {
                problems.push(format!(
                    "{at} classes.{class_name}: {action_name} is not allowed: {why}"
                ));
                continue;
            }
            profile.rules.insert(class, action);
        }
        profile.rules.retain(|_, a| *a != Action::Drop);
        if problems.is_empty() {
            Ok(profile)
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> ProfileConfig {
        serde_json::from_value(serde_json::from_str(text).unwrap()).unwrap()
    }

    #[test]
    fn safe_harbor_lets_out_no_identifier_in_clear() {
        let sh = Profile::safe_harbor();
        for c in Class::ALL {
            let a = sh.action(c);
            if c.safe_harbor_item().is_some() {
                assert!(a.disclosure() <= 1, "{c}: {a}");
            }
            assert!(a.refusal(c).is_none(), "{c}: {a}");
        }
        assert!(sh.years_only());
        assert_eq!(sh.action(Class::FreeText), Action::Drop);
        assert_eq!(sh.action(Class::Blob), Action::Drop);
        assert!(!Profile::limited_data_set().years_only());
        assert!(Profile::limited_data_set().requires_dua);
        assert!(sh.beyond(&sh).is_empty());
        let lds = Profile::limited_data_set();
        let beyond: Vec<Class> = lds.beyond(&sh).into_iter().map(|(c, ..)| c).collect();
        assert_eq!(
            beyond,
            [
                Class::Date,
                Class::BirthDate,
                Class::DeathDate,
                Class::Age,
                Class::City,
                Class::Zip
            ]
        );
    }

    #[test]
    fn custom_profiles_are_allow_lists_and_say_what_they_let_out_beyond_a_built_in() {
        let p = config(
            r#"{"based_on": "safe_harbor", "classes": {"free_text": "keep", "category": "drop"}}"#,
        )
        .build("notes")
        .unwrap();
        assert_eq!(p.action(Class::FreeText), Action::Keep);
        assert_eq!(p.action(Class::Category), Action::Drop);
        assert_eq!(p.action(Class::Code), Action::Keep);
        assert_eq!(
            p.beyond(&Profile::safe_harbor()),
            [(Class::FreeText, Action::Keep, Action::Drop)]
        );
        let bare = config(r#"{"classes": {"code": "keep"}}"#)
            .build("codes")
            .unwrap();
        assert_eq!(bare.lets_out(), [(Class::Code, Action::Keep)]);
    }

    #[test]
    fn old_deny_lists_and_impossible_rules_are_refused_with_every_problem() {
        let problems = config(
            r#"{"remove": ["name"], "dates": "year", "classes": {"patient_key": "keep", "code": "year", "blob": "keep", "nickname": "keep", "zip": "round"}}"#,
        )
        .build("old")
        .unwrap_err();
        assert_eq!(problems.len(), 6, "{problems:#?}");
        assert!(problems[0].contains("remove, dates") && problems[0].contains("allow-lists"));
        let text = problems.join("\n");
        for needle in [
            "keys leave only as pseudonyms",
            "applies to date classes only",
            "documents never leave",
            "\"nickname\" is not a class",
            "\"round\" is not keep",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        let problems = ProfileConfig::default().build(SAFE_HARBOR).unwrap_err();
        assert!(problems[0].contains("cannot be redefined"));
    }
}
