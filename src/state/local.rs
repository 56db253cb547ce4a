//! The `memory` backend's revocations and disabled connectors (DESIGN §3.5): kept in memory
//! for the hot path and in `[state] dir` so they survive reloads and restarts. Files are written atomically: a temp
//! file, fsync, rename, fsync of the folder.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};

use super::{StateError, KEEP_PAST_EXP_SECS};

pub(crate) const STATE_FILE: &str = "revocations.json";

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct RevocationSet {
    /// Revoked token ids and their `exp`, so entries can be dropped once the token expired.
    jtis: HashMap<String, i64>,
    /// Per client: every token with `iat` at or before this second is revoked.
    clients: HashMap<String, i64>,
    /// Connectors switched off by the kill switch.
    disabled: HashSet<String>,
}

impl RevocationSet {
    fn revoke_jti(&mut self, jti: &str, exp: i64, now: i64) {
        self.drop_expired(now);
        self.jtis.insert(jti.to_owned(), exp);
    }

    /// Forgets revoked jtis whose token expired: they are refused anyway once past the leeway
    /// (see the constant).
    fn drop_expired(&mut self, now: i64) {
        self.jtis.retain(|_, &mut exp| !expired(exp, now));
    }

    /// A later revocation never moves the cut-off back (a wall clock stepped back between two
    /// would otherwise make the tokens issued between them valid again).
    fn revoke_client(&mut self, client: &str, now: i64) {
        let cut_off = self.clients.entry(client.to_owned()).or_insert(now);
        *cut_off = (*cut_off).max(now);
    }

    fn set_disabled(&mut self, connector: &str, disabled: bool) {
        if disabled {
            self.disabled.insert(connector.to_owned());
        } else {
            self.disabled.remove(connector);
        }
    }
}

/// Whether a jti revoked with this `exp` no longer needs its entry at `now`.
fn expired(exp: i64, now: i64) -> bool {
    exp.saturating_add(KEEP_PAST_EXP_SECS) < now
}

/// What [`Revocations::entries`] lists.
pub struct Entries {
    /// Revoked token ids and their `exp`.
    pub jtis: Vec<(String, i64)>,
    /// Per client, the second up to which its tokens are revoked.
    pub clients: Vec<(String, i64)>,
    /// Connectors switched off.
    pub disabled: Vec<String>,
}

/// The live revocation state, shared by every request.
#[derive(Debug)]
pub struct Revocations {
    file: PathBuf,
    set: RwLock<RevocationSet>,
    /// Held while the file is written: concurrent admin calls would otherwise share the temp
    /// file (one's rename failing, or publishing the other's half-written bytes), and an older
    /// snapshot could land after a newer one.
    writing: Mutex<()>,
    /// Test hook: writes wait while this holds (a disk that stopped answering), 5 s at most.
    #[cfg(test)]
    pub(super) stall_writes: std::sync::atomic::AtomicBool,
}

impl Revocations {
    /// Loads the state from `dir` (an absent file is an empty state).
    pub fn load(dir: &Path) -> Result<Self, StateError> {
        let file = dir.join(STATE_FILE);
        let mut set: RevocationSet = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: file.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RevocationSet::default(),
            Err(source) => return Err(StateError::Io { path: file, source }),
        };
        // The file keeps what expired while the broker was down until its next write.
        set.drop_expired(chrono::Utc::now().timestamp());
        Ok(Self {
            file,
            set: RwLock::new(set),
            writing: Mutex::new(()),
            #[cfg(test)]
            stall_writes: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether a token is refused by a revocation of its `jti` or of its client.
    pub fn is_revoked(&self, jti: &str, client: &str, iat: i64) -> bool {
        let set = self.read();
        set.jtis.contains_key(jti) || set.clients.get(client).is_some_and(|&at| iat <= at)
    }

    /// The second up to which `client`'s tokens are revoked, if it was revoked.
    pub fn client_cut_off(&self, client: &str) -> Option<i64> {
        self.read().clients.get(client).copied()
    }

    pub fn is_disabled(&self, connector: &str) -> bool {
        self.read().disabled.contains(connector)
    }

    pub fn disabled_connectors(&self) -> Vec<String> {
        let mut v: Vec<String> = self.read().disabled.iter().cloned().collect();
        v.sort();
        v
    }

    /// Forgets revoked jtis whose token expired (the 60 s sweeper calls it: without it, they
    /// stayed in memory until the next jti revocation). The file keeps them until the next
    /// change is written: they are harmless there, and rewriting it for nothing costs an fsync.
    pub fn sweep(&self, now: i64) {
        // A read lock first: the usual sweep finds nothing, and the hot path's readers are not
        // held up by a write lock for it.
        if !self.read().jtis.values().any(|&exp| expired(exp, now)) {
            return;
        }
        self.set
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .drop_expired(now);
    }

    pub fn revoke_jti(&self, jti: &str, exp: i64, now: i64) -> Result<(), StateError> {
        self.update(|s| s.revoke_jti(jti, exp, now))
    }

    /// Revokes every token of `client` issued at or before the second `now`.
    pub fn revoke_client(&self, client: &str, now: i64) -> Result<(), StateError> {
        self.update(|s| s.revoke_client(client, now))
    }

    pub fn set_disabled(&self, connector: &str, disabled: bool) -> Result<(), StateError> {
        self.update(|s| s.set_disabled(connector, disabled))
    }

    /// Puts `change` in force in memory only; [`Self::persist`] writes the state file.
    pub(super) fn apply_in_memory(&self, change: &super::Change) {
        let mut set = self.set.write().unwrap_or_else(|e| e.into_inner());
        match change {
            super::Change::RevokeJti { jti, exp } => {
                set.revoke_jti(jti, *exp, chrono::Utc::now().timestamp());
            }
            super::Change::RevokeClient { client, at } => set.revoke_client(client, *at),
            super::Change::SetDisabled {
                connector,
                disabled,
            } => set.set_disabled(connector, *disabled),
        }
    }

    /// Everything revoked or switched off. The `redis` backend seeds Redis with it (a
    /// `memory` deployment moving to shared state keeps its revocations).
    pub fn entries(&self) -> Entries {
        let set = self.read();
        Entries {
            jtis: set.jtis.iter().map(|(j, e)| (j.clone(), *e)).collect(),
            clients: set.clients.iter().map(|(c, a)| (c.clone(), *a)).collect(),
            disabled: set.disabled.iter().cloned().collect(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, RevocationSet> {
        // A poisoned lock only means a writer panicked between two complete states.
        self.set.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `change`, persists the result, and only then makes it visible... or keeps it
    /// in memory even when the disk write fails: a revocation must bite at once; the error is
    /// returned so the admin call reports that it will not survive a restart.
    fn update(&self, change: impl FnOnce(&mut RevocationSet)) -> Result<(), StateError> {
        change(&mut self.set.write().unwrap_or_else(|e| e.into_inner()));
        self.persist()
    }

    /// Writes the state as it is now to the state file.
    pub(super) fn persist(&self) -> Result<(), StateError> {
        #[cfg(test)]
        for _ in 0..500 {
            if !self.stall_writes.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // One writer at a time, each writing the state as it is once its turn comes: the last
        // write holds every change, whatever order the calls finished in.
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let snapshot = self.read().clone();
        write_atomic(&self.file, &snapshot)
    }
}

/// Writes `value` as JSON to `file` atomically: a temp file, fsync, rename, fsync of the folder.
pub(super) fn write_atomic(file: &Path, value: &impl Serialize) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: file.to_path_buf(),
        source,
    };
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = file.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| io(std::io::Error::other(e)))?;
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, file).map_err(io)?;
    // Best effort (not every filesystem syncs folders), but said when it fails: until the
    // folder is synced, a power cut can undo the rename.
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(path = %dir.display(), error = %e, "cannot sync the state folder");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_client_revocation_never_moves_the_cut_off_back() {
        let dir = tempfile::tempdir().unwrap();
        let r = Revocations::load(dir.path()).unwrap();
        r.revoke_client("bot", 2_000).unwrap();
        // The wall clock stepped back before the second revocation.
        r.revoke_client("bot", 1_000).unwrap();
        assert!(
            r.is_revoked("j", "bot", 1_500),
            "issued before the first cut-off"
        );
        let reloaded = Revocations::load(dir.path()).unwrap();
        assert!(reloaded.is_revoked("j", "bot", 2_000));
        assert!(!reloaded.is_revoked("j", "bot", 2_001));
    }

    #[test]
    fn concurrent_changes_all_persist_and_none_fails() {
        let dir = tempfile::tempdir().unwrap();
        let r = std::sync::Arc::new(Revocations::load(dir.path()).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let r = std::sync::Arc::clone(&r);
                std::thread::spawn(move || {
                    for i in 0..10 {
                        r.revoke_jti(&format!("j{t}-{i}"), 2_000_000_000, 1_000)
                            .expect("every write succeeds");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let again = Revocations::load(dir.path()).unwrap();
        for t in 0..8 {
            for i in 0..10 {
                assert!(again.is_revoked(&format!("j{t}-{i}"), "c", 0), "j{t}-{i}");
            }
        }
    }

    #[test]
    fn expired_jtis_are_swept_and_not_loaded_while_the_others_stay() {
        let dir = tempfile::tempdir().unwrap();
        let r = Revocations::load(dir.path()).unwrap();
        let now = chrono::Utc::now().timestamp();
        r.revoke_jti("live", now + 600, now).unwrap();
        // Revoked when it had not expired yet.
        r.revoke_jti("gone", now - KEEP_PAST_EXP_SECS - 1, now - 10_000)
            .unwrap();
        r.revoke_client("bot", 1_000).unwrap();
        // Kept until a sweep, past its token's expiry and the leeway's margin.
        r.sweep(now - KEEP_PAST_EXP_SECS - 1);
        assert!(r.is_revoked("gone", "c", 0));
        r.sweep(now);
        assert!(!r.is_revoked("gone", "c", 0));
        assert!(r.is_revoked("live", "c", 0));
        assert!(r.is_revoked("j", "bot", 1_000), "client cut-offs stay");
        // The file still holds it (a sweep does not write), and a start does not take it in.
        let file = std::fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        assert!(file.contains("\"gone\""));
        let again = Revocations::load(dir.path()).unwrap();
        assert_eq!(again.entries().jtis, vec![("live".to_owned(), now + 600)]);
    }

    #[test]
    fn revocations_survive_a_reload_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let r = Revocations::load(dir.path()).unwrap();
        r.revoke_jti("j1", 2_000_000_000, 1_000).unwrap();
        r.revoke_client("bot", 1_000).unwrap();
        r.set_disabled("github", true).unwrap();
        let again = Revocations::load(dir.path()).unwrap();
        assert!(again.is_revoked("j1", "other", 5));
        assert!(
            again.is_revoked("j2", "bot", 1_000),
            "same second is revoked"
        );
        assert!(!again.is_revoked("j2", "bot", 1_001));
        assert!(again.is_disabled("github"));
        again.set_disabled("github", false).unwrap();
        assert!(!Revocations::load(dir.path()).unwrap().is_disabled("github"));
    }
}
