//! Writing runtime changes back into the config file. A `sluice backend set-limit`, `drain`,
//! `add` or `remove` edits the file the daemon runs from (its comments and layout kept, with
//! `toml_edit`) and replaces it atomically, so the next reload (SIGHUP, `systemctl reload`)
//! re-reads the change instead of silently reverting it.

use std::{io::Write as _, net::IpAddr, os::unix::fs::PermissionsExt as _, path::Path};

use toml_edit::{value, Array, ArrayOfTables, DocumentMut, InlineTable, Item, Table, Value};

use crate::config::BackendCfg;

/// A change of one backend, as the API makes it.
#[derive(Clone, Debug)]
pub enum BackendEdit {
    Add(BackendCfg),
    Remove,
    Set { max_conns: Option<u32>, weight: Option<u32>, drain: Option<bool> },
}

/// `text` with `edit` applied to backend `address` of service `service`. Only the keys the edit
/// names change; everything else (comments, order, inline or array-of-tables backends) is kept.
pub fn edit_backend(text: &str, service: &str, address: IpAddr, edit: &BackendEdit) -> Result<String, String> {
    let mut doc: DocumentMut = text.parse().map_err(|e| format!("cannot parse it: {e}"))?;
    let services = doc.get_mut("service").and_then(Item::as_array_of_tables_mut).ok_or("it has no [[service]] tables")?;
    let svc = services.iter_mut().find(|t| t.get("name").and_then(Item::as_str) == Some(service)).ok_or_else(|| format!("it has no service named \"{service}\""))?;
    let same = |v: Option<&str>| v.and_then(|s| s.parse::<IpAddr>().ok()) == Some(address);
    match svc.get_mut("backend") {
        Some(Item::ArrayOfTables(list)) => edit_tables(list, same, edit, service, address),
        Some(Item::Value(Value::Array(list))) => edit_inline(list, same, edit, service, address),
        None => match edit {
            BackendEdit::Add(b) => {
                let mut list = ArrayOfTables::new();
                list.push(backend_table(b));
                svc.insert("backend", Item::ArrayOfTables(list));
                Ok(())
            }
            _ => Err(format!("service \"{service}\" has no backend {address} in it")),
        },
        Some(_) => Err(format!("service \"{service}\": `backend` is neither a list of tables nor an array")),
    }?;
    Ok(doc.to_string())
}

fn set_keys(t: &mut dyn toml_edit::TableLike, max_conns: Option<u32>, weight: Option<u32>, drain: Option<bool>) {
    if let Some(m) = max_conns {
        t.insert("max_conns", value(i64::from(m)));
    }
    if let Some(w) = weight {
        t.insert("weight", value(i64::from(w)));
    }
    match drain {
        Some(true) => {
            t.insert("drain", value(true));
        }
        // Not draining is the default: remove the key rather than write `drain = false`.
        Some(false) => {
            t.remove("drain");
        }
        None => {}
    }
}

fn backend_table(b: &BackendCfg) -> Table {
    let mut t = Table::new();
    t.insert("address", value(b.address.to_string()));
    set_keys(&mut t, Some(b.max_conns), Some(b.weight), Some(b.drain));
    t
}

fn edit_tables(list: &mut ArrayOfTables, same: impl Fn(Option<&str>) -> bool, edit: &BackendEdit, service: &str, address: IpAddr) -> Result<(), String> {
    let idx = list.iter().position(|t| same(t.get("address").and_then(Item::as_str)));
    match (edit, idx) {
        (BackendEdit::Add(_), Some(_)) => Err(format!("service \"{service}\" already has backend {address}")),
        (BackendEdit::Add(b), None) => {
            list.push(backend_table(b));
            Ok(())
        }
        (BackendEdit::Remove, Some(i)) => {
            list.remove(i);
            Ok(())
        }
        (BackendEdit::Set { max_conns, weight, drain }, Some(i)) => {
            set_keys(list.get_mut(i).expect("found"), *max_conns, *weight, *drain);
            Ok(())
        }
        (_, None) => Err(format!("service \"{service}\" has no backend {address} in it")),
    }
}

fn edit_inline(list: &mut Array, same: impl Fn(Option<&str>) -> bool, edit: &BackendEdit, service: &str, address: IpAddr) -> Result<(), String> {
    let idx = list.iter().position(|v| same(v.as_inline_table().and_then(|t| t.get("address")).and_then(Value::as_str)));
    match (edit, idx) {
        (BackendEdit::Add(_), Some(_)) => Err(format!("service \"{service}\" already has backend {address}")),
        (BackendEdit::Add(b), None) => {
            let mut t = InlineTable::new();
            t.insert("address", b.address.to_string().into());
            set_keys(&mut t, Some(b.max_conns), Some(b.weight), Some(b.drain));
            list.push(t);
            Ok(())
        }
        (BackendEdit::Remove, Some(i)) => {
            list.remove(i);
            Ok(())
        }
        (BackendEdit::Set { max_conns, weight, drain }, Some(i)) => {
            let t = list.get_mut(i).and_then(Value::as_inline_table_mut).expect("found");
            set_keys(t, *max_conns, *weight, *drain);
            Ok(())
        }
        (_, None) => Err(format!("service \"{service}\" has no backend {address} in it")),
    }
}

/// A new version of a file, written beside it and not yet in place: [`Staged::commit`] renames
/// it over the file (atomic: a reader sees the old file or the new, never half of one);
/// dropping it uncommitted removes it.
pub struct Staged {
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
    done: bool,
}

impl Staged {
    /// Writes `text` to a temporary file beside `path`, with `path`'s mode.
    pub fn write(path: &Path, text: &str) -> std::io::Result<Self> {
        let name = path.file_name().map_or_else(|| "config".into(), |n| n.to_string_lossy().into_owned());
        let tmp = path.with_file_name(format!(".{name}.sluice-{}", std::process::id()));
        let mode = std::fs::metadata(path).map_or(0o600, |m| m.permissions().mode() & 0o7777);
        let staged = Self { tmp, path: path.to_owned(), done: false };
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&staged.tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        Ok(staged)
    }

    pub fn commit(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.tmp, &self.path)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"# The web tier.
[daemon]
interface = "eth0"

[[service]]
name = "web"   # the shop
vip = "10.0.0.100"
port = 80

# First backend: the big one.
[[service.backend]]
address = "10.0.0.11"
max_conns = 200 # sized in 2023
weight = 2

[[service.backend]]
address = "10.0.0.12"
max_conns = 200

[[service]]
name = "api"
vip = "10.0.0.101"
port = 443
backend = [
  { address = "10.0.0.21", max_conns = 50 },
]
"#;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn set_keeps_comments_and_layout() {
        let out = edit_backend(FILE, "web", ip("10.0.0.11"), &BackendEdit::Set { max_conns: Some(10), weight: None, drain: Some(true) }).expect("edit");
        assert!(out.contains("# First backend: the big one."), "{out}");
        assert!(out.contains("name = \"web\"   # the shop"), "{out}");
        assert!(out.contains("max_conns = 10"), "{out}");
        assert!(out.contains("drain = true"), "{out}");
        // Only that backend changed.
        assert_eq!(out.matches("max_conns = 200").count(), 1, "{out}");
        let undrained = edit_backend(&out, "web", ip("10.0.0.11"), &BackendEdit::Set { max_conns: None, weight: None, drain: Some(false) }).expect("edit");
        assert!(!undrained.contains("drain"), "{undrained}");
    }

    #[test]
    fn inline_backends_add_and_remove() {
        let b = BackendCfg { address: ip("10.0.0.22"), max_conns: 7, weight: 1, drain: false, mac: None, health: None, safe_share: None };
        let out = edit_backend(FILE, "api", ip("10.0.0.22"), &BackendEdit::Add(b.clone())).expect("add");
        assert!(out.contains("10.0.0.22") && out.contains("max_conns = 7"), "{out}");
        assert!(edit_backend(&out, "api", ip("10.0.0.22"), &BackendEdit::Add(b.clone())).is_err(), "a second add is refused");
        let out = edit_backend(&out, "api", ip("10.0.0.21"), &BackendEdit::Remove).expect("remove");
        assert!(!out.contains("10.0.0.21"), "{out}");
        let out = edit_backend(&out, "web", ip("10.0.0.13"), &BackendEdit::Add(b)).expect("add as a table");
        let doc: DocumentMut = out.parse().expect("valid TOML");
        assert_eq!(doc["service"][0]["backend"].as_array_of_tables().map(ArrayOfTables::len), Some(3), "{out}");
    }

    #[test]
    fn unknown_names_are_errors() {
        let e = edit_backend(FILE, "nope", ip("10.0.0.11"), &BackendEdit::Remove).expect_err("no such service");
        assert!(e.contains("nope"), "{e}");
        let e = edit_backend(FILE, "web", ip("10.9.9.9"), &BackendEdit::Remove).expect_err("no such backend");
        assert!(e.contains("10.9.9.9"), "{e}");
    }

    #[test]
    fn staged_files_replace_atomically_or_vanish() {
        let dir = std::env::temp_dir().join(format!("sluice-cfgfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("sluice.toml");
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        drop(Staged::write(&path, "abandoned").expect("stage"));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "old");
        assert_eq!(std::fs::read_dir(&dir).expect("dir").count(), 1, "the staged file is removed");
        Staged::write(&path, "new").expect("stage").commit().expect("commit");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
        assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o640, "mode kept");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
