//! Writing module changes made through the admin API back into the
//! configuration file, so that a restart keeps them.
//!
//! The file is edited, not rewritten: its comments, blank lines, key order
//! and the other sections stay as they are. A changed module's `[[modules]]`
//! table keeps the keys it had (changed values are replaced in place, with
//! their comments); a key it gains is added only if its value is not the
//! default; a new module is appended with its non-default keys; a deleted
//! module's table goes. The new text replaces the file atomically (written
//! beside it, synced, renamed over it), with the file's permissions.

use std::io::Write;
use std::path::{Path, PathBuf};

use toml_edit::{ArrayOfTables, DocumentMut, Item, Table};

use super::ModuleConfig;

/// One change to the file's modules.
#[derive(Debug, Clone, Copy)]
pub enum Edit<'a> {
    /// Adds this module, or replaces the module with its ID.
    Put(&'a ModuleConfig),
    /// Removes the module with this ID.
    Remove(&'a str),
}

/// Why the file could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Reading, writing or renaming failed.
    #[error("cannot write the configuration file {path}: {source}")]
    Io {
        /// The file (or the temporary file beside it).
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is no longer a TOML document ksm can edit.
    #[error("cannot edit the configuration file {path}: {message}")]
    Edit {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Applies `edit` to the configuration file at `path`.
pub fn apply(path: &Path, edit: Edit<'_>) -> Result<(), FileError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| FileError::Io { path, source }
    };
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let text = edited(&text, edit).map_err(|message| FileError::Edit {
        path: path.to_owned(),
        message,
    })?;
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ksm.toml".into());
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let temporary = dir.join(format!(".{name}.ksm-new"));
    let permissions = std::fs::metadata(path).map_err(io(path))?.permissions();
    let mut file = std::fs::File::create(&temporary).map_err(io(&temporary))?;
    file.write_all(text.as_bytes()).map_err(io(&temporary))?;
    file.set_permissions(permissions).map_err(io(&temporary))?;
    file.sync_all().map_err(io(&temporary))?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(io(path))?;
    // The rename itself is durable once the directory is synced.
    std::fs::File::open(&dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io(&dir))?;
    Ok(())
}

/// The configuration text with `edit` applied.
pub fn edited(text: &str, edit: Edit<'_>) -> Result<String, String> {
    let mut document: DocumentMut = text.parse().map_err(|e| format!("{e}"))?;
    let modules = document
        .entry("modules")
        .or_insert_with(|| Item::ArrayOfTables(ArrayOfTables::new()))
        .as_array_of_tables_mut()
        .ok_or("`modules` is not written as [[modules]] tables")?;
    let id = match edit {
        Edit::Put(module) => module.id.as_str(),
        Edit::Remove(id) => id,
    };
    let position = modules
        .iter()
        .position(|table| table.get("id").and_then(Item::as_str) == Some(id));
    match (edit, position) {
        (Edit::Remove(_), Some(position)) => {
            modules.remove(position);
        }
        (Edit::Remove(_), None) => {}
        (Edit::Put(module), Some(position)) => {
            let table = modules.get_mut(position).expect("the position was found");
            update(table, module)?;
        }
        (Edit::Put(module), None) => {
            let mut table = Table::new();
            update(&mut table, module)?;
            modules.push(table);
        }
    }
    Ok(document.to_string())
}

/// Makes `table` say `module`, changing as little of it as it can.
fn update(table: &mut Table, module: &ModuleConfig) -> Result<(), String> {
    let fresh = as_table(module)?;
    let defaults = as_table(&ModuleConfig::default())?;
    for (key, value) in fresh.iter() {
        match table.get_mut(key) {
            Some(existing) if same(existing, value) => {}
            Some(existing) => {
                let mut value = value.clone();
                if let (Some(old), Some(new)) = (existing.as_value(), value.as_value_mut()) {
                    *new.decor_mut() = old.decor().clone();
                }
                *existing = value;
            }
            None if defaults
                .get(key)
                .is_some_and(|default| same(default, value)) => {}
            None => {
                table.insert(key, value.clone());
            }
        }
    }
    // An option set to none is written as an absent key.
    let gone: Vec<String> = table
        .iter()
        .map(|(key, _)| key.to_owned())
        .filter(|key| !fresh.contains_key(key))
        .collect();
    for key in gone {
        table.remove(&key);
    }
    Ok(())
}

/// A module as a TOML table (options that are none are absent).
fn as_table(module: &ModuleConfig) -> Result<Table, String> {
    let text = toml::to_string(module).map_err(|e| e.to_string())?;
    let document: DocumentMut = text.parse().map_err(|e| format!("{e}"))?;
    Ok(document.as_table().clone())
}

/// Whether two items hold the same value, whatever their formatting and comments.
fn same(a: &Item, b: &Item) -> bool {
    let value = |item: &Item| {
        let mut document = DocumentMut::new();
        document.insert("v", item.clone());
        toml::from_str::<toml::Table>(&document.to_string())
            .ok()
            .and_then(|mut table| table.remove("v"))
    };
    value(a).is_some() && value(a) == value(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HAND_WRITTEN: &str = r#"# ksm for the north site
[mqtt]
url = "mqtt://127.0.0.1:1883" # the local broker

# Every event, for the data lake.
[[modules]]
id = "lake"   # do not rename: dashboards use it
description = "everything"
subscribe_events = ["*"]
region = "us-east-1"
stream_name = "lake"

# Alerts only.
[[modules]]
id = "alerts"
subscribe_events = ["alert"]
region = "us-east-1"
stream_name = "alerts"
use_uuid = true
"#;

    fn module(id: &str) -> ModuleConfig {
        ModuleConfig {
            id: id.into(),
            subscribe_events: vec!["*".into()],
            region: "us-east-1".into(),
            stream_name: id.into(),
            ..ModuleConfig::default()
        }
    }

    fn modules(text: &str) -> Vec<ModuleConfig> {
        #[derive(serde::Deserialize)]
        struct File {
            modules: Vec<ModuleConfig>,
        }
        toml::from_str::<File>(text)
            .expect("the edited file parses")
            .modules
    }

    #[test]
    fn a_changed_module_keeps_its_comments_order_and_untouched_keys() {
        let mut lake = modules(HAND_WRITTEN).remove(0);
        lake.subscribe_events = vec!["status".into(), "alert".into()];
        lake.bulk_data_label = Some("telemetry".into());
        let text = edited(HAND_WRITTEN, Edit::Put(&lake)).unwrap();
        let expected = HAND_WRITTEN
            .replace(
                "subscribe_events = [\"*\"]\nregion",
                "subscribe_events = [\"status\", \"alert\"]\nregion",
            )
            .replace(
                "stream_name = \"lake\"\n",
                "stream_name = \"lake\"\nbulk_data_label = \"telemetry\"\n",
            );
        assert_eq!(text, expected);
        assert_eq!(
            modules(&text)[0].bulk_data_label.as_deref(),
            Some("telemetry")
        );
    }

    #[test]
    fn a_new_module_is_appended_with_only_what_is_not_default() {
        let text = edited(HAND_WRITTEN, Edit::Put(&module("spare"))).unwrap();
        assert!(text.starts_with(HAND_WRITTEN), "{text}");
        let added = &text[HAND_WRITTEN.len()..];
        assert_eq!(
            added,
            "\n[[modules]]\nid = \"spare\"\nsubscribe_events = [\"*\"]\nregion = \"us-east-1\"\nstream_name = \"spare\"\n"
        );
        let all = modules(&text);
        assert_eq!(all.len(), 3);
        assert_eq!(
            all[2].max_record_size,
            ModuleConfig::default().max_record_size
        );
    }

    #[test]
    fn an_option_set_to_none_and_a_deleted_module_go() {
        let mut alerts = modules(HAND_WRITTEN).remove(1);
        alerts.use_uuid = false;
        let text = edited(HAND_WRITTEN, Edit::Put(&alerts)).unwrap();
        assert!(
            text.contains("use_uuid = false"),
            "a key it had stays: {text}"
        );
        let text = edited(&text, Edit::Remove("lake")).unwrap();
        assert!(!text.contains("id = \"lake\""), "{text}");
        assert!(
            text.starts_with("# ksm for the north site\n[mqtt]"),
            "{text}"
        );
        assert_eq!(modules(&text).len(), 1);
        let mut lake = module("lake");
        lake.role_arn = Some("arn:aws:iam::123456789012:role/w".into());
        let text = edited(&text, Edit::Put(&lake)).unwrap();
        lake.role_arn = None;
        let text = edited(&text, Edit::Put(&lake)).unwrap();
        assert!(!text.contains("role_arn"), "{text}");
    }

    #[test]
    fn a_file_without_modules_gets_them() {
        let text = edited("[mqtt]\nurl = \"mqtt://h\"\n", Edit::Put(&module("one"))).unwrap();
        assert_eq!(modules(&text)[0].id, "one");
    }

    #[test]
    fn the_file_is_replaced_with_its_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ksm-config-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ksm.toml");
        std::fs::write(&path, HAND_WRITTEN).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        apply(&path, Edit::Remove("alerts")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(modules(&text).len(), 1);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
