//! Detached ed25519 signatures of patch files: `suture keygen` makes a key
//! pair, `suture sign` writes `PATCH.sig`, and `--require-signed` accepts a
//! patch only if its signature verifies with one of the public keys in the
//! keys directory (`SUTURE_KEYS_DIR`, default `/etc/suture/keys`, files
//! ending in `.pub`). Keys and signatures are stored as hex text.

use anyhow::{bail, Context, Result};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use std::io::Read;
use std::path::{Path, PathBuf};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str, what: &Path) -> Result<[u8; N]> {
    let t = text.trim();
    if t.len() != 2 * N || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "{} is not a {N}-byte hex value; was it made by `suture keygen` or `suture sign`?",
            what.display()
        );
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(out)
}

/// The keys directory.
pub fn keys_dir() -> PathBuf {
    std::env::var_os("SUTURE_KEYS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/suture/keys"))
}

/// `suture keygen PREFIX`: PREFIX.key (secret, mode 0600) and PREFIX.pub.
pub fn keygen(prefix: &Path) -> Result<(PathBuf, PathBuf)> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("reading /dev/urandom for a new key")?;
    let key = SigningKey::from_bytes(&seed);
    let secret = prefix.with_extension("key");
    let public = prefix.with_extension("pub");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret)
            .with_context(|| format!("creating {}", secret.display()))?;
        writeln!(f, "{}", hex(&seed))?;
    }
    std::fs::write(
        &public,
        format!("{}\n", hex(key.verifying_key().as_bytes())),
    )
    .with_context(|| format!("writing {}", public.display()))?;
    Ok((secret, public))
}

/// `suture sign KEY PATCH`: writes PATCH.sig.
pub fn sign(key: &Path, patch: &Path) -> Result<PathBuf> {
    let text =
        std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
    let key = SigningKey::from_bytes(&unhex::<32>(&text, key)?);
    let bytes = std::fs::read(patch).with_context(|| format!("reading {}", patch.display()))?;
    let sig = key.sign(&bytes);
    let out = sig_path(patch);
    std::fs::write(&out, format!("{}\n", hex(&sig.to_bytes())))
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

fn sig_path(patch: &Path) -> PathBuf {
    let mut s = patch.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// Accept `patch` only if `PATCH.sig` verifies with a key of the keys
/// directory; names the key that did.
pub fn verify(patch: &Path) -> Result<PathBuf> {
    let sig_file = sig_path(patch);
    let text = std::fs::read_to_string(&sig_file).with_context(|| {
        format!(
            "--require-signed: {} has no signature ({} is missing); sign it with `suture sign KEY {}`",
            patch.display(),
            sig_file.display(),
            patch.display()
        )
    })?;
    let sig = Signature::from_bytes(&unhex::<64>(&text, &sig_file)?);
    let bytes = std::fs::read(patch).with_context(|| format!("reading {}", patch.display()))?;
    let dir = keys_dir();
    let mut keys: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| {
            format!(
                "--require-signed: cannot read the keys directory {}",
                dir.display()
            )
        })?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pub"))
        .collect();
    keys.sort();
    for k in &keys {
        let Ok(text) = std::fs::read_to_string(k) else {
            continue;
        };
        let Ok(raw) = unhex::<32>(&text, k) else {
            continue;
        };
        let Ok(key) = VerifyingKey::from_bytes(&raw) else {
            continue;
        };
        if key.verify(&bytes, &sig).is_ok() {
            return Ok(k.clone());
        }
    }
    bail!(
        "--require-signed: the signature {} of {} verifies with none of the {} key(s) in {}; the patch or its signature was changed, or it was signed with another key",
        sig_file.display(),
        patch.display(),
        keys.len(),
        dir.display()
    )
}
