//! Where a secret comes from: a file or an environment variable, never the config itself. Every
//! key Strata reads (KEKs, the audit key, token and pseudonym keys, the HS256 secret) is named
//! in its config section by a `<what>_file` / `<what>_env` pair, of which exactly one is set;
//! this is the one place that pair is read.

use std::path::{Path, PathBuf};

/// A secret's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file (a relative path is the config directory's).
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

impl SecretSource {
    /// The source a config section names by `file` or `env`, if either (None when neither):
    /// both is an error. `at` names the section in messages (`[api.audit]`), `names` the two
    /// settings (`("key_file", "key_env")`).
    pub fn optional(
        file: Option<&str>,
        env: Option<&str>,
        at: &str,
        names: (&str, &str),
    ) -> Result<Option<Self>, String> {
        match (file, env) {
            (Some(f), None) => Ok(Some(SecretSource::File(f.into()))),
            (None, Some(v)) => Ok(Some(SecretSource::Env(v.into()))),
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err(format!(
                "{at}: set at most one of {} and {}",
                names.0, names.1
            )),
        }
    }

    /// The source a config section names by exactly one of `file` and `env`.
    pub fn required(
        file: Option<&str>,
        env: Option<&str>,
        at: &str,
        names: (&str, &str),
    ) -> Result<Self, String> {
        match (file, env) {
            (Some(_), Some(_)) | (None, None) => Err(format!(
                "{at}: set exactly one of {} and {}",
                names.0, names.1
            )),
            _ => Ok(Self::optional(file, env, at, names)?.expect("one is set")),
        }
    }

    /// Reads the secret (a file relative to `base`). The message names the file or the
    /// variable, never the content.
    pub fn read(&self, base: &Path, at: &str) -> Result<String, String> {
        match self {
            SecretSource::File(f) => std::fs::read_to_string(base.join(f))
                .map_err(|e| format!("{at}: cannot read {}: {e}", f.display())),
            SecretSource::Env(v) => {
                std::env::var(v).map_err(|_| format!("{at}: environment variable {v} is not set"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_source_is_read_and_errors_name_it_not_its_content() {
        let names = ("key_file", "key_env");
        assert_eq!(
            SecretSource::required(None, None, "[x]", names).unwrap_err(),
            "[x]: set exactly one of key_file and key_env"
        );
        assert!(SecretSource::required(Some("a"), Some("B"), "[x]", names).is_err());
        assert!(SecretSource::optional(Some("a"), Some("B"), "[x]", names).is_err());
        assert_eq!(SecretSource::optional(None, None, "[x]", names), Ok(None));
        let dir = std::env::temp_dir().join(format!("strata-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("k.hex"), "abcd\n").unwrap();
        let file = SecretSource::required(Some("k.hex"), None, "[x]", names).unwrap();
        assert_eq!(file.read(&dir, "[x]").unwrap(), "abcd\n");
        let missing = SecretSource::File("nope.hex".into()).read(&dir, "[x]");
        assert!(missing
            .unwrap_err()
            .starts_with("[x]: cannot read nope.hex"));
        let unset = SecretSource::Env("STRATA_TEST_SURELY_UNSET_VARIABLE".into()).read(&dir, "[x]");
        assert_eq!(
            unset.unwrap_err(),
            "[x]: environment variable STRATA_TEST_SURELY_UNSET_VARIABLE is not set"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
