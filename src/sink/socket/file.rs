//! The socket file on disk: made after ntpd-rs' `create_unix_socket` (a stale socket replaced, a
//! live one or anything else at the path refused), given its mode and group, and removed on exit
//! only if the path still names this very socket.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::SocketError;
use crate::sys;

/// `sun_path` holds 108 bytes on Linux, the terminating NUL included.
pub(super) const MAX_PATH_BYTES: usize = 107;

/// The socket file as bound: removed on drop, only if the path still names this very socket (a
/// second hark that replaced it as stale keeps its own).
pub(super) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(e) = fs::remove_file(&self.path) {
                    tracing::warn!("cannot remove {}: {e}", self.path.display());
                }
            }
            Ok(_) => tracing::debug!("{} is no longer ours; left as it is", self.path.display()),
            Err(_) => {}
        }
    }
}

impl SocketFile {
    /// Bind a listener at `path` (see [`create_unix_socket`]) and give the socket `mode` and, if
    /// set, group `gid`. An error after the bind removes the socket again.
    pub(super) fn bind(
        path: &Path,
        mode: u32,
        gid: Option<u32>,
    ) -> Result<(UnixListener, SocketFile), SocketError> {
        let listener = create_unix_socket(path)?;
        let io = |what| {
            let path = path.to_owned();
            move |source| SocketError::Io { path, what, source }
        };
        let meta = fs::symlink_metadata(path).map_err(io("reading what was bound"))?;
        // From here on, an error return removes the socket again.
        let file = SocketFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        // Between bind and chmod the socket has the umask's mode; the directory guards it.
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(io("setting its mode"))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(path, None, Some(gid))
                .map_err(io("setting its group (is hark's user a member of it?)"))?;
        }
        Ok((listener, file))
    }
}

/// Bind a listener at `path`, replacing a stale socket only. See the module comment.
fn create_unix_socket(path: &Path) -> Result<UnixListener, SocketError> {
    let len = path.as_os_str().len();
    if len > MAX_PATH_BYTES {
        return Err(SocketError::PathTooLong {
            path: path.to_owned(),
            len,
        });
    }
    let io = |what| {
        let path = path.to_owned();
        move |source| SocketError::Io { path, what, source }
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(SocketError::InUse {
                    path: path.to_owned(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("replacing the stale socket {}", path.display());
                match fs::remove_file(path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(io("removing the stale socket")(e));
                    }
                    _ => {}
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("checking whether the socket there is in use")(e)),
        },
        Ok(meta) => {
            return Err(SocketError::NotASocket {
                path: path.to_owned(),
                kind: describe(meta.file_type()),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspecting the path")(e)),
    }
    UnixListener::bind(path).map_err(|e| {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        match parent {
            Some(parent) if e.kind() == io::ErrorKind::NotFound && !parent.exists() => {
                SocketError::NoParent {
                    path: path.to_owned(),
                    parent: parent.to_owned(),
                }
            }
            _ => io("binding")(e),
        }
    })
}

fn describe(t: fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a socket"
    }
}

/// Resolve a group name; a name that is no group but a number is taken as a gid.
pub(super) fn group_id(name: &str) -> Result<u32, SocketError> {
    match sys::group_id(name) {
        Ok(Some(gid)) => Ok(gid),
        Ok(None) => name
            .parse::<u32>()
            .map_err(|_| SocketError::UnknownGroup(name.to_owned())),
        Err(source) => Err(SocketError::GroupLookup {
            name: name.to_owned(),
            source,
        }),
    }
}
