//! Reload on a change of the config file (DESIGN §3.4), the third trigger beside SIGHUP and
//! `POST /v1/reload`. The file is polled — one `stat` a second — rather than watched with
//! inotify: a folder watch (needed because editors rename a new file over the old one) also
//! wakes on every audit write when the log shares the config's folder, which cost a thread
//! wake-up per proxied call. Changes are debounced, and a reload is attempted only when the
//! file's bytes differ from the config in force, so a save another trigger already loaded is
//! not reloaded (and audited) twice.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::broker::Broker;

/// Quiet time after the last change before reloading: an editor's save is several events
/// (truncate, write, rename), and a half-written file must not be loaded.
pub const DEBOUNCE: Duration = Duration::from_millis(500);

/// How often the file's metadata is looked at.
pub const POLL: Duration = Duration::from_secs(1);

/// The actor recorded in the `admin` audit record of a reload this watcher started.
pub const ACTOR: &str = "watch";

/// Why the config file cannot be watched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The config path has no file name to watch.
    #[error("cannot watch {0}: not a file path")]
    NotAFile(PathBuf),
}

/// Starts the watcher when the config in force came from a file (not `serve --dev`'s, built
/// in memory) — also when the file has changed since it was read: its first look then
/// reloads. A watch that cannot be set up is logged (the other two reload triggers still
/// work) rather than fatal.
pub fn start_if_file_backed(
    broker: &Arc<Broker>,
    stopped: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    if broker.live().config.in_memory {
        return None;
    }
    match spawn(Arc::clone(broker), stopped) {
        Ok(task) => Some(task),
        Err(e) => {
            tracing::warn!(error = %e, "config file changes will not reload; SIGHUP and POST /v1/reload still do");
            None
        }
    }
}

/// Starts watching the config file of `broker`; the returned task reloads on changes until
/// `stopped` turns true.
pub fn spawn(
    broker: Arc<Broker>,
    stopped: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, WatchError> {
    let path = broker.config_path();
    if path.file_name().is_none() {
        return Err(WatchError::NotAFile(path));
    }
    Ok(tokio::spawn(run(broker, path, stopped)))
}

/// What a `stat` tells about the file: enough to notice a write or a rename over it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

async fn run(broker: Arc<Broker>, path: PathBuf, mut stopped: watch::Receiver<bool>) {
    // The content last tried: a broken save is reported once, not on every later poll.
    // (`Some(None)`: an unreadable file was tried.)
    let mut last_tried: Option<Option<String>> = None;
    // Nothing seen yet: the first look compares the file with the config in force, which may
    // have been read from an earlier version of it while the broker started.
    let mut seen = None;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        if stamp(&path) == seen {
            continue;
        }
        // Debounce: wait until the file has stopped changing for DEBOUNCE.
        loop {
            seen = stamp(&path);
            tokio::select! {
                _ = tokio::time::sleep(DEBOUNCE) => {}
                _ = stopped.wait_for(|s| *s) => return,
            }
            if stamp(&path) == seen {
                break;
            }
        }
        let live = broker.live();
        let now = file_sha256(&live.config.path);
        // Also skipped: bytes a reload by another trigger (SIGHUP, the API) just failed on —
        // one broken save is one failed reload, recorded and counted once.
        let failed_already = now
            .as_deref()
            .is_some_and(|sha| super::reload_failed_on(&broker, sha));
        if now.as_deref() == Some(live.config.sha256.as_str())
            || last_tried.as_ref() == Some(&now)
            || failed_already
        {
            continue;
        }
        last_tried = Some(now);
        // Failures are logged, audited and counted by `reload`; the old config stays. Only a
        // broken save is remembered (and not tried again until the file changes): a good one
        // that was loaded may be saved again later, after another reload put other bytes in
        // force (a `git checkout` back), and must then be loaded again. A save that could not
        // be audited was not tried for good: look at it again next round.
        match super::reload(&broker, ACTOR, None).await {
            Ok(()) => last_tried = None,
            Err(super::ReloadError::Invalid(_)) => {}
            Err(super::ReloadError::NotAudited) => {
                last_tried = None;
                seen = None;
            }
        }
    }
}

/// Hex SHA-256 of the file's bytes; `None` when it cannot be read (a reload is then still
/// attempted once, so the problem is logged and audited).
fn file_sha256(path: &Path) -> Option<String> {
    std::fs::read(path)
        .ok()
        .map(|bytes| hex::encode(Sha256::digest(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rename_over_the_file_changes_its_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "a").unwrap();
        let before = stamp(&path);
        let tmp = dir.path().join("c.toml.new");
        std::fs::write(&tmp, "b").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_ne!(stamp(&path), before, "an editor's atomic save is seen");
    }
}
