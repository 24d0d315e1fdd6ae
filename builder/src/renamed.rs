//! The old names of renamed services, so that a push to an old URL is refused with the new
//! name instead of creating a new service under the old one.
//!
//! 1. A rename records `old → new`; records that pointed at `old` now point at `new`
//!    (a service renamed twice names its latest name), and a record of `new` goes (the name
//!    is a service again).
//! 2. A push to a name with no source repository and a record is refused (the smart HTTP
//!    routes); `Builder::add_service` drops the record first: a service created again under
//!    an old name on purpose takes pushes from then on.
//! 3. A delete drops the records that point at the deleted service: its old names are as
//!    free as its own.
//! 4. Kept in `<data>/builder/renamed.json` (written to a temporary file, then renamed over
//!    it), so that a restart remembers them; at most [`MAX_RENAMES`], the oldest dropped
//!    first.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

/// The most records kept.
pub(crate) const MAX_RENAMES: usize = 1024;

/// One rename: a service once called `from` is now `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    from: String,
    to: String,
}

/// The records, oldest first, shared by the smart HTTP routes and the builder's lifecycle.
#[derive(Debug, Clone)]
pub(crate) struct Renamed {
    records: Arc<Mutex<Vec<Record>>>,
    path: PathBuf,
}

impl Renamed {
    /// Reads the records kept at `path`; a missing file is none. A file that cannot be read
    /// or parsed is an error (starting without it would let pushes create services under
    /// names the records keep).
    pub(crate) fn load(path: &Path) -> std::io::Result<Renamed> {
        let records = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(error) => return Err(error),
        };
        Ok(Renamed {
            records: Arc::new(Mutex::new(records)),
            path: path.to_owned(),
        })
    }

    fn records(&self) -> MutexGuard<'_, Vec<Record>> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The name the service once called `name` has now, if it was renamed (rule 2).
    pub(crate) fn new_name(&self, name: &str) -> Option<String> {
        self.records()
            .iter()
            .find(|record| record.from == name)
            .map(|record| record.to.clone())
    }

    /// Records `from → to` (rule 1).
    pub(crate) fn record(&self, from: &str, to: &str) -> std::io::Result<()> {
        let mut records = self.records();
        for record in records.iter_mut().filter(|record| record.to == from) {
            record.to = to.to_owned();
        }
        records
            .retain(|record| record.from != to && record.from != from && record.from != record.to);
        records.push(Record {
            from: from.to_owned(),
            to: to.to_owned(),
        });
        let excess = records.len().saturating_sub(MAX_RENAMES);
        records.drain(..excess);
        self.save(&records)
    }

    /// Drops the record of `name` (rule 2): a service of that name is created on purpose.
    pub(crate) fn forget_old_name(&self, name: &str) -> std::io::Result<()> {
        self.drop_where(|record| record.from == name)
    }

    /// Drops the records that point at `service`, which is deleted (rule 3).
    pub(crate) fn forget_service(&self, service: &str) -> std::io::Result<()> {
        self.drop_where(|record| record.to == service)
    }

    /// Drops the records `drop` picks, and saves them if that changed any.
    fn drop_where(&self, drop: impl Fn(&Record) -> bool) -> std::io::Result<()> {
        let mut records = self.records();
        let before = records.len();
        records.retain(|record| !drop(record));
        if records.len() == before {
            return Ok(());
        }
        self.save(&records)
    }

    /// Writes the records (rule 4), the lock held so that writes keep their order.
    fn save(&self, records: &[Record]) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(records)?;
        let staging = self.path.with_extension("json.new");
        std::fs::write(&staging, bytes)?;
        std::fs::rename(&staging, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_chain_survive_a_reload_and_stay_bounded() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("renamed.json");
        let renamed = Renamed::load(&path).expect("load");
        assert_eq!(renamed.new_name("a"), None);
        renamed.record("a", "b").expect("record");
        renamed.record("b", "c").expect("record");
        assert_eq!(renamed.new_name("a").as_deref(), Some("c"));
        assert_eq!(renamed.new_name("b").as_deref(), Some("c"));
        // Back to an old name: that name is a service again.
        renamed.record("c", "a").expect("record");
        assert_eq!(renamed.new_name("a"), None);
        assert_eq!(renamed.new_name("b").as_deref(), Some("a"));
        assert_eq!(renamed.new_name("c").as_deref(), Some("a"));

        let reloaded = Renamed::load(&path).expect("reload");
        assert_eq!(reloaded.new_name("b").as_deref(), Some("a"));
        reloaded.forget_old_name("b").expect("forget");
        assert_eq!(reloaded.new_name("b"), None);
        reloaded.forget_service("a").expect("forget");
        assert_eq!(Renamed::load(&path).expect("reload").new_name("c"), None);

        for i in 0..MAX_RENAMES + 10 {
            reloaded
                .record(&format!("old-{i}"), &format!("new-{i}"))
                .expect("record");
        }
        let reloaded = Renamed::load(&path).expect("reload");
        assert_eq!(reloaded.records().len(), MAX_RENAMES);
        assert_eq!(reloaded.new_name("old-0"), None);
        assert_eq!(
            reloaded
                .new_name(&format!("old-{}", MAX_RENAMES + 9))
                .as_deref(),
            Some(format!("new-{}", MAX_RENAMES + 9).as_str())
        );

        std::fs::write(&path, "{").expect("write");
        assert!(Renamed::load(&path).is_err());
    }
}
