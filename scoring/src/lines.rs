//! Short texts kept in one allocation.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A short list of one-line texts (an assessment's drivers, an alert's reasons) in one
/// string, each line ended by `\n`; serialized as a list of strings.
///
/// Why not `Vec<String>`: the alert store keeps every battery's latest assessment in
/// memory (and alerts known from the topic), and four reasons as a `Vec<String>` take
/// five allocations and 96 bytes of headers besides their text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextLines(Box<str>);

impl TextLines {
    /// The lines, first first.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.split_terminator('\n')
    }

    pub fn len(&self) -> usize {
        self.0.bytes().filter(|b| *b == b'\n').count()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds a line at the end.
    pub fn push(&mut self, line: &str) {
        *self = self.iter().chain([line]).collect();
    }
}

/// A line break inside a text becomes a space: each text stays one line.
impl<S: AsRef<str>> FromIterator<S> for TextLines {
    fn from_iter<I: IntoIterator<Item = S>>(lines: I) -> Self {
        let mut all = String::new();
        for line in lines {
            all.extend(
                line.as_ref()
                    .chars()
                    .map(|c| if c == '\n' { ' ' } else { c }),
            );
            all.push('\n');
        }
        Self(all.into_boxed_str())
    }
}

impl Serialize for TextLines {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for TextLines {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Vec::<String>::deserialize(d)?.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_back_as_given_and_serialize_as_a_list() {
        let lines: TextLines = ["first", "", "third, with a\nbreak"].into_iter().collect();
        assert_eq!(lines.len(), 3);
        let back: Vec<&str> = lines.iter().collect();
        assert_eq!(back, vec!["first", "", "third, with a break"]);
        let json = serde_json::to_string(&lines).unwrap();
        assert_eq!(json, r#"["first","","third, with a break"]"#);
        let read: TextLines = serde_json::from_str(&json).unwrap();
        assert_eq!(read, lines);
    }

    #[test]
    fn no_lines_is_empty_and_a_push_adds_one() {
        let mut lines = TextLines::default();
        assert!(lines.is_empty());
        assert_eq!(lines.iter().count(), 0);
        assert_eq!(serde_json::to_string(&lines).unwrap(), "[]");
        lines.push("booked");
        lines.push("");
        assert_eq!(lines.iter().collect::<Vec<_>>(), vec!["booked", ""]);
        assert_eq!(lines.len(), 2);
    }
}
