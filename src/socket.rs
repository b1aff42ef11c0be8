//! The milter's unix socket: the directory it lives in, binding it without
//! taking over a live one, its owner and mode, and removing it on exit only
//! while it is still ours.
//!
//! Why each rule:
//! - Postfix on Debian runs smtpd chrooted in /var/spool/postfix and names
//!   a unix milter socket relative to it (docs/postfix.md), so the socket
//!   belongs below /var/spool/postfix, in a directory of its own.
//! - A socket is reachable by whoever may write to it: mode 0660 with the
//!   group of its directory (the Debian package: `dualroute`, which
//!   `postfix` is a member of), never 0666.
//! - `bind` fails on an existing path, and deleting a path that a running
//!   milter listens on leaves that milter alive but unreachable (Postfix
//!   then answers 451 to all mail). So an existing socket is replaced only
//!   when nothing accepts a connection on it (a crash left it behind), and
//!   on exit the path is removed only if it is still the inode we bound.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Who may connect: owner and group (Postfix, through the directory's
/// group). Never world-writable.
pub const SOCKET_MODE: u32 = 0o660;

/// The queue directory Debian's chrooted smtpd sees as `/`.
pub const POSTFIX_CHROOT: &str = "/var/spool/postfix";

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket activation: {0}")]
    Activation(String),
    #[error("socket activation: the service manager passed a socket on {inherited}, but milter.yaml says listen: {listen}; make the socket unit's ListenStream= and `listen:` name the same socket (postfix-config and sendmail-config tell the MTA `listen:`)")]
    Mismatch { inherited: String, listen: String },
    #[error("another dualroute (or another program) is listening on {0}; stop it first, or give this instance another `listen:`")]
    InUse(PathBuf),
    #[error("{path} exists and is not a socket; it is left alone: remove it or choose another `listen:` path")]
    NotASocket { path: PathBuf },
    #[error("{dir} (the directory of the milter socket) does not exist; create it with: install -d -o dualroute -g dualroute -m 0750 {dir}{hint}")]
    NoDirectory { dir: PathBuf, hint: String },
    #[error("{dir} (the directory of the milter socket) is not a directory")]
    NotADirectory { dir: PathBuf },
    #[error("{dir} (the directory of the milter socket) is not writable by this user (uid {uid}); fix it with: install -d -o dualroute -g dualroute -m 0750 {dir}, and run dualroute as user dualroute")]
    NotWritable { dir: PathBuf, uid: u32 },
    #[error("cannot tell whether something listens on {path}: {source}")]
    Probe { path: PathBuf, source: io::Error },
    #[error("cannot remove the stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot listen on unix:{path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot give {path} mode {mode:o} and group {gid} (the group of its directory): {source}; run dualroute as a member of that group")]
    Permissions {
        path: PathBuf,
        mode: u32,
        gid: u32,
        source: io::Error,
    },
}

/// `dualroute check`: for a unix socket, [`check_directory`]; a TCP socket
/// needs nothing.
pub fn check(listen: &crate::config::Socket) -> Result<Vec<String>, SocketError> {
    match listen {
        crate::config::Socket::Unix(path) => check_directory(path),
        crate::config::Socket::Inet { .. } => Ok(Vec::new()),
    }
}

/// The directory of a unix socket exists and this user
/// can create the socket in it. Returns what the admin should know even
/// when it is usable (a running instance holds the socket; Postfix cannot
/// search the directory).
pub fn check_directory(path: &Path) -> Result<Vec<String>, SocketError> {
    let dir = directory(path);
    let meta = match std::fs::metadata(&dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SocketError::NoDirectory {
                hint: chroot_hint(path),
                dir,
            })
        }
        Err(_) => {
            return Err(SocketError::NotWritable {
                dir,
                uid: effective_uid(),
            })
        }
    };
    if !meta.is_dir() {
        return Err(SocketError::NotADirectory { dir });
    }
    if !may_create_in(&dir) {
        return Err(SocketError::NotWritable {
            dir,
            uid: effective_uid(),
        });
    }
    let mut notes = Vec::new();
    if meta.mode() & 0o011 == 0 && meta.uid() != 0 {
        notes.push(format!(
            "{} is not searchable by its group or others: Postfix (user postfix) cannot reach the socket unless it owns the directory",
            dir.display()
        ));
    }
    if is_live(path) {
        notes.push(format!(
            "a milter is listening on {} now (the running service?)",
            path.display()
        ));
    }
    Ok(notes)
}

/// The socket we bound and the file that names it.
#[derive(Debug)]
pub struct BoundSocket {
    pub listener: UnixListener,
    pub file: SocketFile,
}

/// The socket file we created: removed by [`SocketFile::remove_if_ours`]
/// only while the path still names the same inode.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    id: FileId,
}

/// Device and inode, plus ctime: a file system may hand a freed inode
/// number to the next file created (seen on overlayfs), so the number alone
/// does not prove the file is the one we made.
#[derive(Debug, Eq, PartialEq)]
struct FileId {
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// Binds a unix socket at `path`: refuses when something listens there,
/// replaces a stale socket, then sets mode [`SOCKET_MODE`] and the group
/// of the directory.
pub fn bind(path: &Path) -> Result<BoundSocket, SocketError> {
    check_directory(path)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket {
                path: path.to_owned(),
            })
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse(path.to_owned())),
            // Nobody accepts on it: left behind by a crash or a SIGKILL.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
                    path: path.to_owned(),
                    source,
                })?;
                tracing::info!("replaced the stale socket {}", path.display());
            }
            Err(source) => {
                return Err(SocketError::Probe {
                    path: path.to_owned(),
                    source,
                })
            }
        },
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| match source.kind() {
        // Another instance bound it between our probe and our bind.
        io::ErrorKind::AddrInUse => SocketError::InUse(path.to_owned()),
        _ => SocketError::Bind {
            path: path.to_owned(),
            source,
        },
    })?;
    if let Err(e) = set_permissions(path) {
        // We created it a moment ago and it is useless to anyone.
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    // Taken after chmod/chown, which change ctime: the identity the exit
    // compares against.
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(BoundSocket {
            listener,
            file: SocketFile {
                path: path.to_owned(),
                id: FileId::of(&m),
            },
        }),
        Err(source) => Err(SocketError::Bind {
            path: path.to_owned(),
            source,
        }),
    }
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if it is still the one we bound (another
    /// instance may have replaced it after we stopped answering).
    pub fn remove_if_ours(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if FileId::of(&m) == self.id => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!("cannot remove {}: {e}", self.path.display());
                }
            }
            Ok(_) => tracing::info!(
                "{} is no longer our socket (another instance replaced it); left in place",
                self.path.display()
            ),
            Err(_) => {}
        }
    }
}

/// A listening socket passed by a service manager (systemd socket
/// activation, sd_listen_fds(3)): `dualroute.socket` binds, `run` serves.
#[derive(Debug)]
pub enum Inherited {
    Tcp(std::net::TcpListener),
    Unix(UnixListener),
}

/// The socket a service manager passed (LISTEN_PID is this process,
/// LISTEN_FDS=1, the socket is fd 3), or `None` when there is none.
///
/// It must be the socket `listen:` names: `postfix-config` and
/// `sendmail-config` point the MTA at `listen:`, so a unit listening
/// elsewhere would leave the MTA knocking at a socket nobody serves (and
/// every message tempfailed, or passed unfiltered with
/// milter_default_action = accept). A disagreement stops `run` instead
/// (docs/design.md, "Socket activation"). Call once: the descriptor is
/// taken over.
pub fn inherited(listen: &crate::config::Socket) -> Result<Option<Inherited>, SocketError> {
    let fds = sd_notify::listen_fds()
        .map_err(|e| SocketError::Activation(format!("LISTEN_PID/LISTEN_FDS: {e}")))?;
    let mut fds = fds.into_iter();
    let fd = match (fds.next(), fds.len()) {
        (None, _) => return Ok(None),
        (Some(fd), 0) => fd,
        (Some(_), more) => {
            return Err(SocketError::Activation(format!(
            "LISTEN_FDS={}: dualroute serves one socket; give its socket unit one ListenStream=",
            more + 1
        )))
        }
    };
    // SAFETY: sd_listen_fds(3): with LISTEN_PID our pid, descriptors from
    // 3 on are passed to this process, open, and nothing else in it uses
    // them; `listen_fds` returned fd 3 once and this is its only owner.
    let socket = socket2::Socket::from(unsafe {
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
    });
    let not_listening = |why: String| {
        SocketError::Activation(format!("fd {fd} (LISTEN_FDS=1) is not a listening stream socket: {why}; the socket unit needs ListenStream="))
    };
    match (socket.r#type(), socket.is_listener()) {
        (Ok(socket2::Type::STREAM), Ok(true)) => {}
        (Err(e), _) | (_, Err(e)) => return Err(not_listening(e.to_string())),
        (Ok(_), Ok(_)) => return Err(not_listening("not SOCK_STREAM, or not listening".into())),
    }
    let local = socket
        .local_addr()
        .map_err(|e| not_listening(e.to_string()))?;
    let mismatch = |inherited: String| SocketError::Mismatch {
        inherited,
        listen: listen.to_string(),
    };
    match (listen, local.as_socket(), local.as_pathname()) {
        (crate::config::Socket::Inet { host, port }, Some(addr), _) => {
            let named = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), *port))
                .map(|mut addrs| addrs.any(|a| a == addr))
                .unwrap_or(false);
            if !named {
                return Err(mismatch(format!("inet:{addr}")));
            }
            Ok(Some(Inherited::Tcp(socket.into())))
        }
        (crate::config::Socket::Unix(path), None, Some(bound)) => {
            if bound != path.as_path() {
                return Err(mismatch(format!("unix:{}", bound.display())));
            }
            Ok(Some(Inherited::Unix(socket.into())))
        }
        (_, Some(addr), _) => Err(mismatch(format!("inet:{addr}"))),
        (_, None, Some(bound)) => Err(mismatch(format!("unix:{}", bound.display()))),
        (_, None, None) => Err(mismatch("an unnamed socket".into())),
    }
}

/// Mode 0660 and the directory's group: Postfix reaches the socket through
/// group membership (`adduser postfix dualroute`), nobody else at all.
fn set_permissions(path: &Path) -> Result<(), SocketError> {
    let gid = std::fs::metadata(directory(path))
        .map(|m| m.gid())
        .unwrap_or(0);
    let err = |source| SocketError::Permissions {
        path: path.to_owned(),
        mode: SOCKET_MODE,
        gid,
        source,
    };
    let current = std::fs::symlink_metadata(path).map_err(err)?;
    if current.gid() != gid {
        std::os::unix::fs::lchown(path, None, Some(gid)).map_err(err)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(err)
}

/// Whether something accepts connections on `path`.
pub fn is_live(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

fn directory(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("/"),
    }
}

/// `listen: unix:/dualroute/dualroute.sock` is what smtpd_milters says
/// inside the chroot; milter.yaml needs the real path.
fn chroot_hint(path: &Path) -> String {
    if path.starts_with(POSTFIX_CHROOT) {
        return String::new();
    }
    let real = Path::new(POSTFIX_CHROOT).join(path.strip_prefix("/").unwrap_or(path));
    format!(
        ". If {} is the path Postfix's chrooted smtpd uses (smtpd_milters = unix:{}), milter.yaml needs the real path: listen: unix:{}",
        path.display(),
        path.display(),
        real.display()
    )
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// access(2) W_OK|X_OK: what creating a file in `dir` needs.
fn may_create_in(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_for_a_chroot_relative_path() {
        let h = chroot_hint(Path::new("/dualroute/dualroute.sock"));
        assert!(
            h.contains("listen: unix:/var/spool/postfix/dualroute/dualroute.sock"),
            "{h}"
        );
        assert_eq!(
            chroot_hint(Path::new("/var/spool/postfix/dualroute/x.sock")),
            ""
        );
    }

    #[test]
    fn live_stale_and_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let first = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(bind(&path), Err(SocketError::InUse(_))));
        // The refusal left the first socket in place and answering.
        assert!(is_live(&path));
        let BoundSocket { listener, file } = first;
        drop(listener);
        // Now stale: replaced.
        let second = bind(&path).unwrap();
        // The first file is no longer at the path: it must not remove it.
        file.remove_if_ours();
        assert!(is_live(&path));
        second.file.remove_if_ours();
        assert!(!path.exists());
    }

    #[test]
    fn missing_directory_says_what_to_run() {
        let e = check_directory(Path::new("/nonexistent-dualroute/x.sock")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("install -d -o dualroute -g dualroute -m 0750 /nonexistent-dualroute"),
            "{s}"
        );
    }

    #[test]
    fn a_regular_file_is_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        std::fs::write(&path, "x").unwrap();
        assert!(matches!(bind(&path), Err(SocketError::NotASocket { .. })));
        assert!(path.exists());
    }
}
