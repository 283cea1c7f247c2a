//! A small flag parser for the examples (`--name value`, `--switch`), with errors that name
//! the flag.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// A command-line error: an unknown flag, a missing or malformed value.
#[derive(Debug, Clone, PartialEq)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

/// Parsed flags. Each getter removes what it reads; [`Flags::finish`] rejects leftovers.
#[derive(Debug, Default)]
pub struct Flags {
    values: BTreeMap<String, Option<String>>,
}

impl Flags {
    /// Parses `--name value` and `--switch` arguments. `switches` lists the flags that take no
    /// value.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        switches: &[&str],
    ) -> Result<Self, CliError> {
        let mut values = BTreeMap::new();
        let mut it = args.into_iter().peekable();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                return Err(CliError(format!(
                    "unexpected argument {a:?} (flags start with --)"
                )));
            };
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (name.to_string(), None),
            };
            let value = if switches.contains(&name.as_str()) {
                if inline.is_some() {
                    return Err(CliError(format!("--{name} takes no value")));
                }
                None
            } else {
                match inline.or_else(|| it.next()) {
                    Some(v) => Some(v),
                    None => return Err(CliError(format!("--{name} needs a value"))),
                }
            };
            values.insert(name, value);
        }
        Ok(Flags { values })
    }

    /// Whether a switch was given.
    pub fn switch(&mut self, name: &str) -> bool {
        self.values.remove(name).is_some()
    }

    /// A flag's value parsed as `T`, or `None` if absent.
    pub fn get<T: FromStr>(&mut self, name: &str) -> Result<Option<T>, CliError>
    where
        T::Err: fmt::Display,
    {
        match self.values.remove(name) {
            None => Ok(None),
            Some(None) => Err(CliError(format!("--{name} needs a value"))),
            Some(Some(v)) => v
                .parse()
                .map(Some)
                .map_err(|e| CliError(format!("--{name} {v:?}: {e}"))),
        }
    }

    /// Errors if any flag was not read.
    pub fn finish(self) -> Result<(), CliError> {
        match self.values.keys().next() {
            Some(k) => Err(CliError(format!("unknown flag --{k}"))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_values_and_switches() {
        let mut f = Flags::parse(args("--epochs 3 --fast --lr=0.5"), &["fast"]).unwrap();
        assert_eq!(f.get::<u32>("epochs").unwrap(), Some(3));
        assert_eq!(f.get::<f32>("lr").unwrap(), Some(0.5));
        assert!(f.switch("fast"));
        assert!(!f.switch("sweep"));
        f.finish().unwrap();
    }

    #[test]
    fn errors_name_the_flag() {
        let mut f = Flags::parse(args("--epochs x"), &[]).unwrap();
        assert!(f.get::<u32>("epochs").unwrap_err().0.contains("--epochs"));
        let f = Flags::parse(args("--bogus 1"), &[]).unwrap();
        assert_eq!(f.finish().unwrap_err().0, "unknown flag --bogus");
        assert!(Flags::parse(args("--epochs"), &[]).is_err());
        assert!(Flags::parse(args("stray"), &[]).is_err());
    }
}
