//! Names and labels people give things, parsed once at the edge: past here, a name holds
//! nothing that could rewrite a log line, a CSV export or a terminal, and is never blank.

use std::fmt;

use serde::Serialize;

use crate::error::ApiError;

/// Is `c` a character no name may hold: a control (C0, DEL, C1: NUL, CR, LF, ESC, …), a line
/// or paragraph separator, or a bidirectional override or isolate (which make a name read
/// differently than it is stored).
fn forbidden_in_name(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A display name (device, API key, project, webhook, alert rule): 1 to 200 characters once
/// leading and trailing whitespace is trimmed, none of them a control character.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    pub const MAX_CHARS: usize = 200;

    /// `field` names the value in the 400 (`name`, `[2].name`).
    pub fn parse(field: &str, value: &str) -> Result<Self, ApiError> {
        let invalid = |why: &str| ApiError::bad_request("invalid_name", format!("{field}: {why}"));
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(invalid("must not be empty or only whitespace"));
        }
        if trimmed.chars().count() > Self::MAX_CHARS {
            return Err(invalid("at most 200 characters"));
        }
        // Checked before trimming: a trailing CR or NEL is refused, not quietly dropped.
        if let Some(bad) = value.chars().find(|c| forbidden_in_name(*c)) {
            return Err(invalid(&format!(
                "must not contain control characters (found U+{:04X})",
                u32::from(bad)
            )));
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// Like [`Name::parse`] for an optional name.
    pub fn parse_optional(field: &str, value: Option<&str>) -> Result<Option<Self>, ApiError> {
        value.map(|value| Self::parse(field, value)).transpose()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A label (group, tag, command name, metric of a rule): 1 to 64 of `[A-Za-z0-9_.-]`, safe
/// in a filter, a subject or a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Label(String);

impl Label {
    pub const MAX_LEN: usize = 64;

    /// `field` names the value in the 400 (`group`, `tags[1]`).
    pub fn parse(field: &str, value: &str) -> Result<Self, ApiError> {
        let valid = !value.is_empty()
            && value.len() <= Self::MAX_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if valid {
            Ok(Self(value.to_owned()))
        } else {
            Err(ApiError::bad_request(
                "invalid_field",
                format!("{field}: {value:?} must be 1 to 64 of [A-Za-z0-9_.-]"),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_never_blank_or_control() {
        assert_eq!(
            Name::parse("name", "  Boiler room 2 ").unwrap().as_str(),
            "Boiler room 2"
        );
        assert_eq!(
            Name::parse("name", "Küche – Fenster 🚪").unwrap().as_str(),
            "Küche – Fenster 🚪"
        );
        for blank in ["", " ", "\t \u{3000}", "\u{a0}"] {
            let error = Name::parse("name", blank).unwrap_err();
            assert_eq!(error.reason, "invalid_name");
            assert!(
                error.message.starts_with("name: must not be empty"),
                "{error}"
            );
        }
        for bad in [
            "a\rb",
            "a\nb",
            "a\u{1b}[31mred",
            "a\0b",
            "a\u{7f}",
            "a\u{85}b",
            "a\u{9b}31m",
            "a\tb",
            "a\u{2028}b",
            "abc\u{202e}gpj.exe",
            "name\n",
            "c1\u{85}",
        ] {
            let error = Name::parse("[1].name", bad).unwrap_err();
            assert_eq!(error.reason, "invalid_name", "{bad:?}");
            assert!(
                error
                    .message
                    .starts_with("[1].name: must not contain control"),
                "{error}"
            );
        }
        assert!(Name::parse("name", &"x".repeat(200)).is_ok());
        assert!(Name::parse("name", &"é".repeat(201)).is_err());
    }

    #[test]
    fn labels_are_a_small_alphabet() {
        assert!(Label::parse("group", "floor-2.east_wing").is_ok());
        for bad in ["", "a b", "a\nb", "a\0", "é", &"x".repeat(65)] {
            let error = Label::parse("tags[0]", bad).unwrap_err();
            assert!(error.message.starts_with("tags[0]:"), "{bad:?}");
        }
    }
}
