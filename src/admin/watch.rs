//! Reload on a change of the config file (DESIGN §3.4), the third trigger beside SIGHUP and
//! `POST /v1/reload`. The file's folder is watched (editors replace a file by renaming a new
//! one over it, which a watch on the file itself would lose); changes are debounced, and a
//! reload is attempted only when the file's bytes differ from the config in force, so a save
//! that another trigger already loaded is not reloaded (and audited) twice.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::broker::Broker;

/// Quiet time after the last change before reloading: an editor's save is several events
/// (truncate, write, rename), and a half-written file must not be loaded.
pub const DEBOUNCE: Duration = Duration::from_millis(500);

/// The actor recorded in the `admin` audit record of a reload this watcher started.
pub const ACTOR: &str = "watch";

/// Why the config file cannot be watched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The config path has no file name or folder to watch.
    #[error("cannot watch {0}: not a file path")]
    NotAFile(PathBuf),
    /// The OS watch could not be set up (inotify limits, a missing folder, …).
    #[error("cannot watch {path}: {source}")]
    Notify {
        /// The folder.
        path: PathBuf,
        /// The cause.
        source: notify::Error,
    },
}

/// Whether `config_path` is a real file holding exactly the config in force — false for
/// `serve --dev`, whose config is built in memory under a name that is not on disk.
pub fn is_backed_by_file(config_path: &Path, sha256: &str) -> bool {
    file_sha256(config_path).is_some_and(|s| s == sha256)
}

/// Starts the watcher when the config in force came from a real file; a watch that cannot be
/// set up is logged (the other two reload triggers still work) rather than fatal.
pub fn start_if_file_backed(
    broker: &Arc<Broker>,
    stopped: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let live = broker.live();
    if !is_backed_by_file(&live.config.path, &live.config.sha256) {
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
    let (Some(name), Some(dir)) = (path.file_name(), path.parent()) else {
        return Err(WatchError::NotAFile(path));
    };
    let name = name.to_owned();
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<Event>| {
        if let Ok(event) = res {
            if is_change(&event.kind) && event.paths.iter().any(|p| p.file_name() == Some(&name)) {
                // The receiver is gone only when the broker is stopping.
                let _ = tx.send(());
            }
        }
    })
    .map_err(|source| WatchError::Notify {
        path: dir.to_owned(),
        source,
    })?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|source| WatchError::Notify {
            path: dir.to_owned(),
            source,
        })?;
    Ok(tokio::spawn(run(broker, watcher, rx, stopped)))
}

/// Content changes only: the broker's own reads of the file (open, close-after-read) are
/// events too and must not trigger a reload loop.
fn is_change(kind: &EventKind) -> bool {
    match kind {
        // Reading a file can update its access time: metadata changes are not content changes.
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        _ => false,
    }
}

async fn run(
    broker: Arc<Broker>,
    // Held so the OS watch lives as long as this task.
    _watcher: RecommendedWatcher,
    mut changes: mpsc::UnboundedReceiver<()>,
    mut stopped: watch::Receiver<bool>,
) {
    // The content last tried: a broken save is reported once, not on every later event.
    // (`Some(None)`: an unreadable file was tried.)
    let mut last_tried: Option<Option<String>> = None;
    loop {
        tokio::select! {
            change = changes.recv() => {
                if change.is_none() {
                    return;
                }
            }
            _ = stopped.wait_for(|s| *s) => return,
        }
        if !settle(&mut changes, &mut stopped).await {
            return;
        }
        let live = broker.live();
        let now = file_sha256(&live.config.path);
        if now.as_deref() == Some(live.config.sha256.as_str()) || last_tried.as_ref() == Some(&now)
        {
            continue;
        }
        last_tried = Some(now);
        // Failures are logged, audited and counted by `reload`; the old config stays.
        let _ = super::reload(&broker, ACTOR).await;
    }
}

/// Waits until no change arrived for [`DEBOUNCE`]; false when the broker is stopping.
async fn settle(
    changes: &mut mpsc::UnboundedReceiver<()>,
    stopped: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        tokio::select! {
            change = changes.recv() => {
                if change.is_none() {
                    return false;
                }
            }
            _ = tokio::time::sleep(DEBOUNCE) => return true,
            _ = stopped.wait_for(|s| *s) => return false,
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
    use notify::event::{CreateKind, MetadataKind};

    #[test]
    fn reads_of_the_file_are_not_changes() {
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(!is_change(&EventKind::Modify(ModifyKind::Metadata(
            MetadataKind::AccessTime
        ))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Any)));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
    }

    #[test]
    fn a_file_that_differs_from_the_config_in_force_is_not_backing_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "a").unwrap();
        let sha = hex::encode(Sha256::digest(b"a"));
        assert!(is_backed_by_file(&path, &sha));
        std::fs::write(&path, "b").unwrap();
        assert!(!is_backed_by_file(&path, &sha));
        assert!(!is_backed_by_file(&dir.path().join("missing.toml"), &sha));
    }
}
