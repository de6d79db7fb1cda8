//! Module settings as the guest keeps them, and their validation.

use crate::error::Error;

/// The subscription entry that matches every event type.
pub const ALL_EVENTS: &str = "*";

/// One module's settings, as handed to `configure` (the WIT `module-settings`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Event types to forward; `*` forwards every event. Empty: no events.
    pub subscribe_events: Vec<String>,
    /// Bulk data label to forward; `None`: no bulk data.
    pub bulk_data_label: Option<String>,
    /// `true`: every record gets a fresh UUIDv4 as its partition key.
    pub use_uuid: bool,
    /// Largest record allowed, in bytes, counting data plus partition key.
    pub max_record_size: u32,
}

impl Settings {
    /// Checks the settings the guest cannot work with: a zero
    /// `max-record-size` and an empty string among `subscribe-events`.
    /// The field names in the errors are the WIT ones.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_record_size == 0 {
            return Err(Error::InvalidSettings {
                field: "max-record-size".to_owned(),
                detail: "must be at least 1 byte".to_owned(),
            });
        }
        if let Some(i) = self.subscribe_events.iter().position(String::is_empty) {
            return Err(Error::InvalidSettings {
                field: "subscribe-events".to_owned(),
                detail: format!("entry {i} is an empty event type"),
            });
        }
        Ok(())
    }

    /// Whether events of `event_type` are forwarded: an exact, case-sensitive
    /// match with an entry of `subscribe-events`, or a `*` entry.
    pub fn subscribes_to(&self, event_type: &str) -> bool {
        self.subscribe_events
            .iter()
            .any(|s| s == ALL_EVENTS || s == event_type)
    }

    /// Whether bulk data published under `label` is forwarded.
    pub fn forwards_label(&self, label: &str) -> bool {
        self.bulk_data_label.as_deref() == Some(label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(events: &[&str]) -> Settings {
        Settings {
            subscribe_events: events.iter().map(|s| (*s).to_owned()).collect(),
            bulk_data_label: Some("lbl".to_owned()),
            use_uuid: false,
            max_record_size: 1024,
        }
    }

    #[test]
    fn valid_settings_pass() {
        assert_eq!(settings(&["a", "*"]).validate(), Ok(()));
        assert_eq!(settings(&[]).validate(), Ok(()));
    }

    #[test]
    fn zero_max_record_size_is_refused() {
        let mut s = settings(&["a"]);
        s.max_record_size = 0;
        let Err(Error::InvalidSettings { field, .. }) = s.validate() else {
            panic!("expected invalid-settings");
        };
        assert_eq!(field, "max-record-size");
    }

    #[test]
    fn empty_event_type_is_refused() {
        let Err(Error::InvalidSettings { field, .. }) = settings(&["a", ""]).validate() else {
            panic!("expected invalid-settings");
        };
        assert_eq!(field, "subscribe-events");
    }

    #[test]
    fn subscription_is_exact_and_case_sensitive() {
        let s = settings(&["temp", "Ünïcode-事件"]);
        assert!(s.subscribes_to("temp"));
        assert!(!s.subscribes_to("Temp"));
        assert!(!s.subscribes_to("temp "));
        assert!(!s.subscribes_to("te"));
        assert!(s.subscribes_to("Ünïcode-事件"));
        assert!(!s.subscribes_to("ünïcode-事件"));
    }

    #[test]
    fn star_subscribes_to_everything_and_empty_to_nothing() {
        assert!(settings(&["*"]).subscribes_to("anything"));
        assert!(settings(&["x", "*"]).subscribes_to("y"));
        assert!(!settings(&[]).subscribes_to("x"));
        // `*` is only special as a whole entry.
        assert!(!settings(&["temp*"]).subscribes_to("temperature"));
    }

    #[test]
    fn label_must_match_exactly() {
        let s = settings(&[]);
        assert!(s.forwards_label("lbl"));
        assert!(!s.forwards_label("LBL"));
        let none = Settings {
            bulk_data_label: None,
            ..s
        };
        assert!(!none.forwards_label("lbl"));
        assert!(!none.forwards_label(""));
    }
}
