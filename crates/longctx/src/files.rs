//! Opening the files a user or an operator names (a prompt, a LongRoPE factors file, a text, a
//! model) so that a wrong path can only fail, at once and in one sentence: a FIFO, `/dev/stdin`
//! or a device is refused before it is opened (they block forever or never end), a directory is
//! called one, and nothing larger than its reader can use is read.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// A MiB, for limits and their messages.
pub const MIB: u64 = 1 << 20;

/// Opens `path` for reading if it is a regular file (after symlinks); `what` names it in errors
/// ("the factors file").
pub fn open_regular(path: &Path, what: &str) -> Result<File> {
    let io = io_error(path);
    let kind = std::fs::metadata(path).map_err(io)?.file_type();
    if !kind.is_file() {
        return Err(not_a_file(path, what, &kind));
    }
    // Non-blocking, so that a file swapped for a FIFO since the check cannot hang the open; the
    // handle's own type is checked again below.
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path).map_err(io)?;
    let kind = file.metadata().map_err(io)?.file_type();
    if !kind.is_file() {
        return Err(not_a_file(path, what, &kind));
    }
    Ok(file)
}

/// The bytes of the regular file `path`, refused if it holds more than `limit` bytes.
pub fn read_limited(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    read_open(open_regular(path, what)?, path, limit, what)
}

/// The bytes of `file`, opened by [`open_regular`] from `path`, refused past `limit` bytes.
pub fn read_open(file: File, path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    // One byte past the limit tells a file that grew since it was opened from one that fits.
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error(path))?;
    if bytes.len() as u64 > limit {
        return Err(Error::InvalidOption(format!(
            "{} is larger than {} MiB, more than {what} can be; check the path",
            path.display(),
            limit.div_ceil(MIB)
        )));
    }
    Ok(bytes)
}

/// What an I/O failure on `path` is reported as.
fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + Copy + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn not_a_file(path: &Path, what: &str, kind: &std::fs::FileType) -> Error {
    let is = if kind.is_dir() {
        "a directory"
    } else {
        "not a regular file (a pipe, socket or device)"
    };
    Error::InvalidOption(format!(
        "{} is {is}; {what} must be a regular file",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_file_within_its_limit_and_refuses_one_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        std::fs::write(&path, b"twelve bytes").unwrap();
        assert_eq!(
            read_limited(&path, 12, "the file").unwrap(),
            b"twelve bytes"
        );
        let err = read_limited(&path, 11, "the file").unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
    }

    #[test]
    fn refuses_directories_devices_and_pipes_without_opening_them() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_limited(dir.path(), MIB, "the file")
            .unwrap_err()
            .to_string();
        assert!(err.contains("a directory"), "{err}");
        let err = read_limited(Path::new("/dev/zero"), MIB, "the file")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
        // A FIFO with no writer would block a plain open forever.
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let err = read_limited(&fifo, MIB, "the file")
                .unwrap_err()
                .to_string();
            assert!(err.contains("not a regular file"), "{err}");
        }
        let err = read_limited(&dir.path().join("absent"), MIB, "the file")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read"), "{err}");
    }
}
