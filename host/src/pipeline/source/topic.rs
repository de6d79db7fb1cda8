//! MODE's MQTT topics: what a topic name says about its message.

/// Topic filters ksm subscribes to.
pub const SUBSCRIPTIONS: [&str; 3] = [
    "/devices/+/event",
    "/devices/+/bulkData/+",
    "/homes/+/event",
];

/// What a message is, by its topic. The IDs come from the topic, never from
/// the payload, so a device cannot speak for another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// `/devices/{device_id}/event`
    DeviceEvent {
        /// Device ID.
        device_id: u64,
    },
    /// `/homes/{home_id}/event`
    HomeEvent {
        /// Home ID.
        home_id: u64,
    },
    /// `/devices/{device_id}/bulkData/{label}`
    BulkData {
        /// Device ID.
        device_id: u64,
        /// Bulk data label.
        label: String,
    },
}

impl Topic {
    /// Parses a topic name; the error says what is wrong with it.
    pub fn parse(topic: &str) -> Result<Topic, String> {
        let levels: Vec<&str> = topic.split('/').collect();
        let id = |text: &str, what: &str| {
            canonical_id(text).ok_or_else(|| {
                format!(
                    "topic `{topic}`: {what} `{text}` is not a decimal integer ID \
                     (digits only, no leading zeros, at most 18446744073709551615)"
                )
            })
        };
        match levels[..] {
            ["", "devices", device, "event"] => Ok(Topic::DeviceEvent {
                device_id: id(device, "device ID")?,
            }),
            ["", "homes", home, "event"] => Ok(Topic::HomeEvent {
                home_id: id(home, "home ID")?,
            }),
            ["", "devices", device, "bulkData", label] if !label.is_empty() => {
                Ok(Topic::BulkData {
                    device_id: id(device, "device ID")?,
                    label: label.to_owned(),
                })
            }
            _ => Err(format!(
                "topic `{topic}` is not a MODE device or home topic"
            )),
        }
    }
}

/// A decimal ID written the one way it can be: digits only, no sign, no
/// leading zeros (so `/devices/0001/event` is not device 1's topic).
fn canonical_id(text: &str) -> Option<u64> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    canonical.then(|| text.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mode_topics() {
        assert_eq!(
            Topic::parse("/devices/1001/event"),
            Ok(Topic::DeviceEvent { device_id: 1001 })
        );
        assert_eq!(
            Topic::parse("/homes/77/event"),
            Ok(Topic::HomeEvent { home_id: 77 })
        );
        assert_eq!(
            Topic::parse("/devices/0/event"),
            Ok(Topic::DeviceEvent { device_id: 0 })
        );
        assert_eq!(
            Topic::parse("/devices/5/bulkData/telemetry"),
            Ok(Topic::BulkData {
                device_id: 5,
                label: "telemetry".into()
            })
        );
    }

    #[test]
    fn refuses_other_topics() {
        for bad in [
            "/devices/abc/event",
            "/devices/-1/event",
            "/devices/+1/event",
            "/devices/0001/event",
            "/devices/00/event",
            "/devices/18446744073709551616/event",
            "/homes/077/event",
            "/devices/01/bulkData/x",
            "devices/1/event",
            "/devices/1/bulkData/",
            "/devices/1/other",
            "/homes/x/event",
        ] {
            assert!(Topic::parse(bad).is_err(), "{bad}");
        }
    }
}
