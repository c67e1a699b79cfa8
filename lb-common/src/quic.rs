//! QUIC-LB connection IDs (draft-ietf-quic-load-balancers): the CID format, its
//! plaintext and encrypted (AES-128 single-pass and four-pass Feistel) codecs,
//! and the map layouts the data plane routes by. Shared by the kernel program
//! and the daemon, so every loop is bounded and every table index masked.

use core::fmt;
use core::mem::size_of;

/// The config id a server uses when it has no configuration: never routable.
pub const UNROUTABLE_CONFIG: u8 = 0b111;
/// Highest config id an operator may configure.
pub const MAX_CONFIG_ID: u8 = 6;
pub const MIN_SERVER_ID_LEN: u8 = 1;
/// 15 keeps a server id and its length inside one 16-byte key.
pub const MAX_SERVER_ID_LEN: u8 = 15;
pub const MIN_NONCE_LEN: u8 = 4;
pub const MAX_NONCE_LEN: u8 = 18;
/// QUIC v1 CIDs are at most 20 bytes, one of them the first octet.
pub const MAX_PLAINTEXT_LEN: u8 = 19;
pub const MAX_CID_LEN: usize = 1 + MAX_PLAINTEXT_LEN as usize;

/// How the server id and nonce are carried after the first octet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CidMode {
    Plaintext = 0,
    Encrypted = 1,
}

impl TryFrom<u8> for CidMode {
    type Error = u8;
    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            0 => Ok(Self::Plaintext),
            1 => Ok(Self::Encrypted),
            other => Err(other),
        }
    }
}

/// One QUIC-LB configuration, as the operator writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidConfig {
    pub config_id: u8,
    pub server_id_len: u8,
    pub nonce_len: u8,
    pub mode: CidMode,
    /// Only read in `Encrypted` mode.
    pub key: [u8; 16],
}

/// A configuration QUIC-LB does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CidConfigError {
    /// 0b111 is reserved for unroutable CIDs; 0..=6 are usable.
    ConfigId(u8),
    ServerIdLen(u8),
    NonceLen(u8),
    /// Server id and nonce must fit a 20-byte CID with its first octet.
    TooLong {
        server_id_len: u8,
        nonce_len: u8,
    },
}

impl fmt::Display for CidConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ConfigId(id) => write!(
                f,
                "config_id {id} is out of range: use 0..={MAX_CONFIG_ID} (7 marks unroutable CIDs)"
            ),
            Self::ServerIdLen(n) => write!(
                f,
                "server_id_len {n} is out of range: use {MIN_SERVER_ID_LEN}..={MAX_SERVER_ID_LEN}"
            ),
            Self::NonceLen(n) => write!(
                f,
                "nonce_len {n} is out of range: use {MIN_NONCE_LEN}..={MAX_NONCE_LEN}"
            ),
            Self::TooLong {
                server_id_len,
                nonce_len,
            } => write!(
                f,
                "server_id_len + nonce_len = {} exceeds {MAX_PLAINTEXT_LEN} (a QUIC CID is at most 20 bytes)",
                u16::from(server_id_len) + u16::from(nonce_len)
            ),
        }
    }
}

impl core::error::Error for CidConfigError {}

/// Why a CID could not be built or read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CidError {
    Config(CidConfigError),
    /// The CID is shorter than this configuration's CIDs.
    TooShort {
        len: usize,
        need: usize,
    },
    /// The first octet says 0b111: the server had no configuration.
    Unroutable,
    /// The first octet names another configuration.
    OtherConfig(u8),
    /// A server id, nonce or output buffer of the wrong size.
    ServerIdLen {
        len: usize,
        need: usize,
    },
    NonceLen {
        len: usize,
        need: usize,
    },
    OutputTooShort {
        len: usize,
        need: usize,
    },
}

impl fmt::Display for CidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Config(e) => e.fmt(f),
            Self::TooShort { len, need } => {
                write!(f, "CID of {len} bytes is shorter than {need}")
            }
            Self::Unroutable => f.write_str("CID uses the unroutable config id 0b111"),
            Self::OtherConfig(id) => write!(f, "CID uses config id {id}, not this one"),
            Self::ServerIdLen { len, need } => {
                write!(f, "server id of {len} bytes, the config says {need}")
            }
            Self::NonceLen { len, need } => {
                write!(f, "nonce of {len} bytes, the config says {need}")
            }
            Self::OutputTooShort { len, need } => {
                write!(f, "output of {len} bytes cannot hold a {need}-byte CID")
            }
        }
    }
}

impl core::error::Error for CidError {}

impl From<CidConfigError> for CidError {
    fn from(e: CidConfigError) -> Self {
        Self::Config(e)
    }
}

/// The AES tables both sides compute once (userspace: `AES_TABLES`; the kernel
/// program reads a copy the daemon writes to a map).
pub static AES_TABLES: AesTables = AesTables::new();

impl CidConfig {
    /// The draft's limits on a configuration.
    pub fn check(&self) -> Result<(), CidConfigError> {
        if self.config_id > MAX_CONFIG_ID {
            return Err(CidConfigError::ConfigId(self.config_id));
        }
        if !(MIN_SERVER_ID_LEN..=MAX_SERVER_ID_LEN).contains(&self.server_id_len) {
            return Err(CidConfigError::ServerIdLen(self.server_id_len));
        }
        if !(MIN_NONCE_LEN..=MAX_NONCE_LEN).contains(&self.nonce_len) {
            return Err(CidConfigError::NonceLen(self.nonce_len));
        }
        if self.plaintext_len() > usize::from(MAX_PLAINTEXT_LEN) {
            return Err(CidConfigError::TooLong {
                server_id_len: self.server_id_len,
                nonce_len: self.nonce_len,
            });
        }
        Ok(())
    }

    /// Bytes after the first octet: server id and nonce.
    pub fn plaintext_len(&self) -> usize {
        usize::from(self.server_id_len) + usize::from(self.nonce_len)
    }

    /// Length of the CIDs this configuration makes.
    pub fn cid_len(&self) -> usize {
        1 + self.plaintext_len()
    }

    /// The first octet: config id in the top 3 bits, then the length of the
    /// rest of the CID (length self-description, as the draft's test vectors).
    pub fn first_octet(&self) -> u8 {
        // plaintext_len <= 19 after check(): fits the 5 low bits.
        (self.config_id << 5) | (self.plaintext_len() as u8 & 0x1f)
    }

    /// Writes a CID carrying `server_id` and `nonce` to `out`; returns its length.
    pub fn encode(
        &self,
        server_id: &[u8],
        nonce: &[u8],
        out: &mut [u8],
    ) -> Result<usize, CidError> {
        self.check()?;
        let sid_len = usize::from(self.server_id_len);
        let nonce_len = usize::from(self.nonce_len);
        if server_id.len() != sid_len {
            return Err(CidError::ServerIdLen {
                len: server_id.len(),
                need: sid_len,
            });
        }
        if nonce.len() != nonce_len {
            return Err(CidError::NonceLen {
                len: nonce.len(),
                need: nonce_len,
            });
        }
        let need = self.cid_len();
        if out.len() < need {
            return Err(CidError::OutputTooShort {
                len: out.len(),
                need,
            });
        }
        let mut block = [0u8; MAX_PLAINTEXT_LEN as usize];
        block[..sid_len].copy_from_slice(server_id);
        block[sid_len..sid_len + nonce_len].copy_from_slice(nonce);
        if self.mode == CidMode::Encrypted {
            let keys = RoundKeys::expand(&AES_TABLES, &self.key);
            seal(
                &AES_TABLES,
                &keys,
                self.server_id_len,
                self.nonce_len,
                &mut block,
            );
        }
        out[0] = self.first_octet();
        out[1..need].copy_from_slice(&block[..need - 1]);
        Ok(need)
    }

    /// Reads the server id of `cid` into `server_id` (exactly `server_id_len`
    /// bytes). Bytes after this configuration's length are ignored (a server
    /// may append its own).
    pub fn decode(&self, cid: &[u8], server_id: &mut [u8]) -> Result<(), CidError> {
        self.check()?;
        let sid_len = usize::from(self.server_id_len);
        if server_id.len() != sid_len {
            return Err(CidError::ServerIdLen {
                len: server_id.len(),
                need: sid_len,
            });
        }
        let need = self.cid_len();
        let Some(&first) = cid.first() else {
            return Err(CidError::TooShort { len: 0, need });
        };
        let config = first >> 5;
        if config == UNROUTABLE_CONFIG {
            return Err(CidError::Unroutable);
        }
        if config != self.config_id {
            return Err(CidError::OtherConfig(config));
        }
        if cid.len() < need {
            return Err(CidError::TooShort {
                len: cid.len(),
                need,
            });
        }
        let mut block = [0u8; MAX_PLAINTEXT_LEN as usize];
        block[..need - 1].copy_from_slice(&cid[1..need]);
        let mut sid = [0u8; 16];
        match self.mode {
            CidMode::Plaintext => sid[..sid_len].copy_from_slice(&block[..sid_len]),
            CidMode::Encrypted => {
                let keys = RoundKeys::expand(&AES_TABLES, &self.key);
                open_server_id(
                    &AES_TABLES,
                    &keys,
                    self.server_id_len,
                    self.nonce_len,
                    &block,
                    &mut sid,
                );
            }
        }
        server_id.copy_from_slice(&sid[..sid_len]);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// AES-128 (FIPS-197), table-driven: one round table per direction (the other
// three are byte rotations of it) plus the two S-boxes, 2.5 KiB in all, so the
// kernel program can hold them in one map value.

/// Lookup tables for AES-128. Big-endian column words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct AesTables {
    /// SubBytes then MixColumns of one byte: (2s, s, s, 3s).
    pub te: [u32; 256],
    /// InvSubBytes then InvMixColumns of one byte: (14s, 9s, 13s, 11s).
    pub td: [u32; 256],
    pub sbox: [u8; 256],
    pub inv_sbox: [u8; 256],
}
const _: () = assert!(size_of::<AesTables>() == 2560);

const fn xtime(b: u8) -> u8 {
    (b << 1) ^ if b & 0x80 != 0 { 0x1b } else { 0 }
}

const fn gmul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0u8;
    let mut i = 0;
    while i < 8 {
        if b & 1 != 0 {
            p ^= a;
        }
        a = xtime(a);
        b >>= 1;
        i += 1;
    }
    p
}

impl AesTables {
    /// Computes the tables (at compile time for `AES_TABLES`).
    pub const fn new() -> Self {
        let mut sbox = [0u8; 256];
        let mut inv_sbox = [0u8; 256];
        // Walk the multiplicative group with generator 3: p runs over x^k,
        // q over its inverse x^-k; the S-box is the affine map of q.
        let mut p: u8 = 1;
        let mut q: u8 = 1;
        loop {
            p = p ^ xtime(p);
            q ^= q << 1;
            q ^= q << 2;
            q ^= q << 4;
            if q & 0x80 != 0 {
                q ^= 0x09;
            }
            let s = q ^ q.rotate_left(1) ^ q.rotate_left(2) ^ q.rotate_left(3) ^ q.rotate_left(4);
            sbox[p as usize] = s ^ 0x63;
            if p == 1 {
                break;
            }
        }
        sbox[0] = 0x63;
        let mut te = [0u32; 256];
        let mut td = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            inv_sbox[sbox[i] as usize] = i as u8;
            i += 1;
        }
        i = 0;
        while i < 256 {
            let s = sbox[i];
            te[i] =
                (gmul(s, 2) as u32) << 24 | (s as u32) << 16 | (s as u32) << 8 | gmul(s, 3) as u32;
            let v = inv_sbox[i];
            td[i] = (gmul(v, 14) as u32) << 24
                | (gmul(v, 9) as u32) << 16
                | (gmul(v, 13) as u32) << 8
                | gmul(v, 11) as u32;
            i += 1;
        }
        Self {
            te,
            td,
            sbox,
            inv_sbox,
        }
    }
}

impl Default for AesTables {
    fn default() -> Self {
        Self::new()
    }
}

#[inline(always)]
fn te(t: &AesTables, w: u32, shift: u32, rot: u32) -> u32 {
    t.te[((w >> shift) & 0xff) as usize].rotate_right(rot)
}

#[inline(always)]
fn td(t: &AesTables, w: u32, shift: u32, rot: u32) -> u32 {
    t.td[((w >> shift) & 0xff) as usize].rotate_right(rot)
}

#[inline(always)]
fn sb(t: &AesTables, w: u32, shift: u32) -> u32 {
    u32::from(t.sbox[((w >> shift) & 0xff) as usize]) << shift
}

#[inline(always)]
fn isb(t: &AesTables, w: u32, shift: u32) -> u32 {
    u32::from(t.inv_sbox[((w >> shift) & 0xff) as usize]) << shift
}

/// Round keys of one AES-128 key: encryption, and the equivalent inverse
/// cipher's (decryption) schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct RoundKeys {
    pub enc: [[u32; 4]; 11],
    pub dec: [[u32; 4]; 11],
}
const _: () = assert!(size_of::<RoundKeys>() == 352);

impl RoundKeys {
    /// FIPS-197 key expansion.
    pub fn expand(t: &AesTables, key: &[u8; 16]) -> Self {
        let mut w = [0u32; 44];
        for (i, c) in key.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        let mut rcon: u8 = 1;
        for i in 4..44 {
            let mut tmp = w[i - 1];
            if i % 4 == 0 {
                tmp = tmp.rotate_left(8);
                tmp = sb(t, tmp, 24) | sb(t, tmp, 16) | sb(t, tmp, 8) | sb(t, tmp, 0);
                tmp ^= u32::from(rcon) << 24;
                rcon = xtime(rcon);
            }
            w[i] = w[i - 4] ^ tmp;
        }
        let mut enc = [[0u32; 4]; 11];
        for (r, rk) in enc.iter_mut().enumerate() {
            rk.copy_from_slice(&w[4 * r..4 * r + 4]);
        }
        let mut dec = [[0u32; 4]; 11];
        dec[0] = enc[10];
        dec[10] = enc[0];
        for r in 1..10 {
            for c in 0..4 {
                // InvMixColumns of the key word: td undoes the S-box, so feed it sbox first.
                let k = enc[10 - r][c];
                let s = sb(t, k, 24) | sb(t, k, 16) | sb(t, k, 8) | sb(t, k, 0);
                dec[r][c] = td(t, s, 24, 0) ^ td(t, s, 16, 8) ^ td(t, s, 8, 16) ^ td(t, s, 0, 24);
            }
        }
        Self { enc, dec }
    }
}

#[inline(always)]
fn load(block: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_be_bytes([block[0], block[1], block[2], block[3]]),
        u32::from_be_bytes([block[4], block[5], block[6], block[7]]),
        u32::from_be_bytes([block[8], block[9], block[10], block[11]]),
        u32::from_be_bytes([block[12], block[13], block[14], block[15]]),
    ]
}

#[inline(always)]
fn store(s: [u32; 4], block: &mut [u8; 16]) {
    block[0..4].copy_from_slice(&s[0].to_be_bytes());
    block[4..8].copy_from_slice(&s[1].to_be_bytes());
    block[8..12].copy_from_slice(&s[2].to_be_bytes());
    block[12..16].copy_from_slice(&s[3].to_be_bytes());
}

/// AES-128 encryption of one block, in place.
#[inline(always)]
pub fn encrypt_block(t: &AesTables, keys: &RoundKeys, block: &mut [u8; 16]) {
    cipher(
        &keys.enc,
        block,
        1,
        |w, sh, rot| te(t, w, sh, rot),
        |w, sh| sb(t, w, sh),
    );
}

/// AES-128 decryption of one block, in place (equivalent inverse cipher).
#[inline(always)]
pub fn decrypt_block(t: &AesTables, keys: &RoundKeys, block: &mut [u8; 16]) {
    cipher(
        &keys.dec,
        block,
        3,
        |w, sh, rot| td(t, w, sh, rot),
        |w, sh| isb(t, w, sh),
    );
}

/// The cipher in either direction. Byte `j` of output column `c` comes from
/// column `c + step * j`: `step` 1 is ShiftRows (encryption), 3 is
/// InvShiftRows (decryption); `table` and `sbox` are that direction's
/// T-table and S-box.
#[inline(always)]
fn cipher(
    rk: &[[u32; 4]; 11],
    block: &mut [u8; 16],
    step: usize,
    table: impl Fn(u32, u32, u32) -> u32,
    sbox: impl Fn(u32, u32) -> u32,
) {
    let col = |c: usize, j: usize| (c + step * j) & 3;
    let mut s = load(block);
    for c in 0..4 {
        s[c] ^= rk[0][c];
    }
    let mut r = 1;
    // A bounded loop, not unrolled: the kernel program stays small.
    while r < 10 {
        let k = rk[r];
        let mut n = [0u32; 4];
        for c in 0..4 {
            n[c] = table(s[col(c, 0)], 24, 0)
                ^ table(s[col(c, 1)], 16, 8)
                ^ table(s[col(c, 2)], 8, 16)
                ^ table(s[col(c, 3)], 0, 24)
                ^ k[c];
        }
        s = n;
        r += 1;
    }
    let mut n = [0u32; 4];
    for c in 0..4 {
        n[c] = (sbox(s[col(c, 0)], 24)
            | sbox(s[col(c, 1)], 16)
            | sbox(s[col(c, 2)], 8)
            | sbox(s[col(c, 3)], 0))
            ^ rk[10][c];
    }
    store(n, block);
}

// ---------------------------------------------------------------------------
// The draft's four-pass Feistel network. Halves live in 16-byte buffers: their
// first `half` bytes are the half, the rest zero. All loops run 16 times and
// test the length, so the verifier sees constant bounds.

/// One pass: `dst ^= truncate(AES(expand(len, pass, src)), half)`.
#[inline(always)]
fn feistel_pass(
    t: &AesTables,
    keys: &RoundKeys,
    len: u8,
    half: usize,
    pass: u8,
    src: &[u8; 16],
    dst: &mut [u8; 16],
) {
    let mut block = [0u8; 16];
    for i in 0..14 {
        if i < half {
            block[i] = src[i];
        }
    }
    block[14] = len;
    block[15] = pass;
    encrypt_block(t, keys, &mut block);
    for i in 0..16 {
        if i < half {
            dst[i] ^= block[i];
        }
    }
}

/// Odd lengths share the middle byte: left keeps its high nibble, right its low.
#[inline(always)]
fn clear_left(h: &mut [u8; 16], half: usize, odd: bool) {
    if odd {
        h[(half - 1) & 0xf] &= 0xf0;
    }
}

#[inline(always)]
fn clear_right(h: &mut [u8; 16], odd: bool) {
    if odd {
        h[0] &= 0x0f;
    }
}

/// Splits `block[..len]` into the two halves.
#[inline(always)]
fn split(
    block: &[u8; MAX_PLAINTEXT_LEN as usize],
    len: usize,
    half: usize,
) -> ([u8; 16], [u8; 16]) {
    let odd = !len.is_multiple_of(2);
    let mut buf = [0u8; 32];
    buf[..MAX_PLAINTEXT_LEN as usize].copy_from_slice(block);
    // Masked so the verifier sees every index in bounds (len - half <= 9).
    let rstart = (len - half) & 15;
    let mut left = [0u8; 16];
    let mut right = [0u8; 16];
    for i in 0..10 {
        if i < half {
            left[i] = buf[i];
            right[i] = buf[(rstart + i) & 31];
        }
    }
    clear_left(&mut left, half, odd);
    clear_right(&mut right, odd);
    (left, right)
}

/// Joins the halves back into `len` bytes (the middle byte of an odd
/// length holds both nibbles).
#[inline(always)]
fn join(left: &[u8; 16], right: &[u8; 16], len: usize, half: usize) -> [u8; 32] {
    let rstart = (len - half) & 15;
    let mut out = [0u8; 32];
    for i in 0..10 {
        if i < half {
            out[i] |= left[i];
            out[(rstart + i) & 31] |= right[i];
        }
    }
    out
}

/// Encrypts `block[..server_id_len + nonce_len]` (server id, nonce) in place.
/// The lengths must have passed `CidConfig::check`.
pub fn seal(
    t: &AesTables,
    keys: &RoundKeys,
    server_id_len: u8,
    nonce_len: u8,
    block: &mut [u8; MAX_PLAINTEXT_LEN as usize],
) {
    let len = usize::from(server_id_len) + usize::from(nonce_len);
    if len == 16 {
        let mut b = [0u8; 16];
        b.copy_from_slice(&block[..16]);
        encrypt_block(t, keys, &mut b);
        block[..16].copy_from_slice(&b);
        return;
    }
    let odd = !len.is_multiple_of(2);
    let half = len.div_ceil(2);
    let l = len as u8;
    let (mut left, mut right) = split(block, len, half);
    feistel_pass(t, keys, l, half, 1, &left, &mut right);
    clear_right(&mut right, odd);
    feistel_pass(t, keys, l, half, 2, &right, &mut left);
    clear_left(&mut left, half, odd);
    feistel_pass(t, keys, l, half, 3, &left, &mut right);
    clear_right(&mut right, odd);
    feistel_pass(t, keys, l, half, 4, &right, &mut left);
    clear_left(&mut left, half, odd);
    let out = join(&left, &right, len, half);
    block.copy_from_slice(&out[..MAX_PLAINTEXT_LEN as usize]);
}

/// The load balancer's side: the server id of an encrypted CID whose bytes
/// after the first octet are `block[..server_id_len + nonce_len]`, written to
/// `sid[..server_id_len]` (the rest of `sid` is left zero). Three AES passes
/// when the nonce is at least as long as the server id, else four; one AES
/// decryption when the two make 16 bytes. The lengths must have passed
/// `CidConfig::check`.
#[inline(always)]
pub fn open_server_id(
    t: &AesTables,
    keys: &RoundKeys,
    server_id_len: u8,
    nonce_len: u8,
    block: &[u8; MAX_PLAINTEXT_LEN as usize],
    sid: &mut [u8; 16],
) {
    let sid_len = usize::from(server_id_len);
    let len = sid_len + usize::from(nonce_len);
    *sid = [0u8; 16];
    if len == 16 {
        let mut b = [0u8; 16];
        b.copy_from_slice(&block[..16]);
        decrypt_block(t, keys, &mut b);
        for i in 0..16 {
            if i < sid_len {
                sid[i] = b[i];
            }
        }
        return;
    }
    let odd = !len.is_multiple_of(2);
    let half = len.div_ceil(2);
    let l = len as u8;
    let (mut left, mut right) = split(block, len, half);
    // left_2, right_2 -> left_1
    feistel_pass(t, keys, l, half, 4, &right, &mut left);
    clear_left(&mut left, half, odd);
    // -> right_1
    feistel_pass(t, keys, l, half, 3, &left, &mut right);
    clear_right(&mut right, odd);
    // -> left_0
    feistel_pass(t, keys, l, half, 2, &right, &mut left);
    clear_left(&mut left, half, odd);
    if sid_len > len / 2 {
        // The server id reaches into right_0: one more pass.
        feistel_pass(t, keys, l, half, 1, &left, &mut right);
        clear_right(&mut right, odd);
    } else {
        right = [0u8; 16];
    }
    let plain = join(&left, &right, len, half);
    for i in 0..16 {
        if i < sid_len {
            sid[i] = plain[i];
        }
    }
}

// ---------------------------------------------------------------------------
// Map layouts: what the daemon writes for the data plane.

/// `QuicServiceEntry::flags`: the service routes short-header packets by CID.
pub const QUIC_ENABLED: u8 = 1;

/// Value of `LB_QUIC_SVCS[service id]`: the service's QUIC-LB configuration
/// and, in encrypted mode, its key's round keys.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuicServiceEntry {
    pub flags: u8,
    pub config_id: u8,
    pub server_id_len: u8,
    pub nonce_len: u8,
    /// `CidMode` as u8.
    pub mode: u8,
    pub _pad: [u8; 3],
    pub keys: RoundKeys,
}
const _: () = assert!(size_of::<QuicServiceEntry>() == 360);

impl QuicServiceEntry {
    /// The entry of a service without QUIC-LB.
    pub const DISABLED: QuicServiceEntry = QuicServiceEntry {
        flags: 0,
        config_id: 0,
        server_id_len: 0,
        nonce_len: 0,
        mode: 0,
        _pad: [0; 3],
        keys: RoundKeys {
            enc: [[0; 4]; 11],
            dec: [[0; 4]; 11],
        },
    };

    /// The entry for a checked configuration.
    pub fn new(t: &AesTables, c: &CidConfig) -> Self {
        let keys = match c.mode {
            CidMode::Plaintext => Self::DISABLED.keys,
            CidMode::Encrypted => RoundKeys::expand(t, &c.key),
        };
        QuicServiceEntry {
            flags: QUIC_ENABLED,
            config_id: c.config_id,
            server_id_len: c.server_id_len,
            nonce_len: c.nonce_len,
            mode: c.mode as u8,
            _pad: [0; 3],
            keys,
        }
    }
}

impl Default for QuicServiceEntry {
    fn default() -> Self {
        Self::DISABLED
    }
}

/// Key of `LB_QUIC_SIDS`: a service and one of its server ids, zero-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuicSidKey {
    pub service: u32,
    pub server_id: [u8; 16],
}
const _: () = assert!(size_of::<QuicSidKey>() == 20);

impl QuicSidKey {
    /// `None` when `server_id` is longer than 16 bytes.
    pub fn new(service: u32, server_id: &[u8]) -> Option<Self> {
        let mut k = QuicSidKey {
            service,
            server_id: [0; 16],
        };
        k.server_id
            .get_mut(..server_id.len())?
            .copy_from_slice(server_id);
        Some(k)
    }
}

/// Value of `LB_QUIC_SIDS`: the backend holding the server id, with the
/// generation it had when the entry was written (see `BackendEntry`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuicSidValue {
    pub backend: u32,
    pub generation: u32,
}
const _: () = assert!(size_of::<QuicSidValue>() == 8);

counted! {
    /// How a UDP packet to a QUIC-LB service was routed, indexed by
    /// `quic_stats_index` in `LB_QUIC_STATS` (per CPU).
    pub enum QuicRoute [QUIC_ROUTE_COUNT, QUIC_ROUTE_NAMES] {
        /// By the server id in its destination CID.
        Cid = 0 => "cid",
        /// Fallback (4-tuple): a long header (Initial, 0-RTT, Handshake,
        /// Retry), whose CID the client chose.
        LongHeader = 1 => "long_header",
        /// Fallback: the UDP payload ends before the CID does.
        TooShort = 2 => "too_short",
        /// Fallback: the CID's config id is 0b111 or not the service's.
        UnroutableConfig = 3 => "unroutable_config",
        /// Fallback: no backend of the service holds the server id (never
        /// assigned, backend removed or down).
        UnknownServerId = 4 => "unknown_server_id",
        /// Fallback: an encrypted CID the program could not decrypt (the
        /// TC ingress program has no decryption).
        NotDecrypted = 5 => "not_decrypted",
    }
}

/// Index of a service's counter for `route` in `LB_QUIC_STATS`.
#[inline(always)]
pub fn quic_stats_index(service: u32, route: QuicRoute) -> u32 {
    service * QUIC_ROUTE_COUNT + route as u32
}

/// `LB_QUIC_PROGS` slots: the decrypt program, and `lb_xdp` it hands the
/// packet back to.
pub const PROG_DECRYPT: u32 = 0;
pub const PROG_XDP: u32 = 1;

/// `QuicScratch::state`.
pub const SCRATCH_IDLE: u32 = 0;
/// `lb_xdp` asks the decrypt program for the server id of `block`.
pub const SCRATCH_REQUEST: u32 = 1;
/// The decrypt program answered (`found` says whether it could).
pub const SCRATCH_DONE: u32 = 2;

/// Per-CPU hand-over between `lb_xdp` and the decrypt program it
/// tail-calls (which has a stack of its own for AES), which tail-calls
/// `lb_xdp` back. The answer is used only for the same service and the
/// same CID bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuicScratch {
    pub state: u32,
    pub service: u32,
    pub found: u32,
    pub _pad: u32,
    /// The CID bytes after the first octet, zero-padded.
    pub block: [u64; 3],
    pub server_id: [u8; 16],
}
const _: () = assert!(size_of::<QuicScratch>() == 56);

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        let b = s.as_bytes();
        for i in 0..b.len() / 2 {
            let d = |c: u8| (c as char).to_digit(16).unwrap() as u8;
            out[i] = d(b[2 * i]) << 4 | d(b[2 * i + 1]);
        }
        out
    }

    fn bytes(s: &str) -> &'static [u8] {
        assert!(s.len().is_multiple_of(2), "odd hex string {s}");
        let v = hex(s);
        let n = s.len() / 2;
        // Leak a little per test: the tests are short-lived.
        let b: &'static mut [u8; 32] = std_box(v);
        &b[..n]
    }

    extern crate std;
    fn std_box(v: [u8; 32]) -> &'static mut [u8; 32] {
        std::boxed::Box::leak(std::boxed::Box::new(v))
    }

    fn config(config_id: u8, sid: &[u8], nonce: &[u8], mode: CidMode, key: &str) -> CidConfig {
        let mut k = [0u8; 16];
        if !key.is_empty() {
            k.copy_from_slice(bytes(key));
        }
        CidConfig {
            config_id,
            server_id_len: sid.len() as u8,
            nonce_len: nonce.len() as u8,
            mode,
            key: k,
        }
    }

    /// Encodes the vector's server id and nonce, compares with its CID, and
    /// decodes the CID back to the server id.
    fn roundtrip(cfg: &CidConfig, sid: &[u8], nonce: &[u8], cid: &[u8]) {
        let mut out = [0u8; MAX_CID_LEN];
        let n = cfg.encode(sid, nonce, &mut out).unwrap();
        assert_eq!(&out[..n], cid);
        let mut got = [0u8; 16];
        cfg.decode(cid, &mut got[..sid.len()]).unwrap();
        assert_eq!(&got[..sid.len()], sid);
    }

    #[test]
    fn aes_fips197_appendix_c1() {
        let t = AesTables::new();
        let mut key = [0u8; 16];
        key.copy_from_slice(bytes("000102030405060708090a0b0c0d0e0f"));
        let keys = RoundKeys::expand(&t, &key);
        let mut b = [0u8; 16];
        b.copy_from_slice(bytes("00112233445566778899aabbccddeeff"));
        encrypt_block(&t, &keys, &mut b);
        assert_eq!(&b, bytes("69c4e0d86a7b0430d8cdb78070b4c55a"));
        decrypt_block(&t, &keys, &mut b);
        assert_eq!(&b, bytes("00112233445566778899aabbccddeeff"));
    }

    #[test]
    fn aes_sbox_spot_values() {
        let t = AesTables::new();
        assert_eq!(t.sbox[0x00], 0x63);
        assert_eq!(t.sbox[0x53], 0xed);
        assert_eq!(t.inv_sbox[0xed], 0x53);
        assert_eq!(t.te[0], 0xc663_63a5);
        assert_eq!(t.td[0], 0x51f4_a750);
    }

    #[test]
    fn aes_draft_example_passes() {
        // The draft's encryption example, pass 1 and pass 4 blocks.
        let t = AesTables::new();
        let mut key = [0u8; 16];
        key.copy_from_slice(bytes("fdf726a9893ec05c0632d3956680baf0"));
        let keys = RoundKeys::expand(&t, &key);
        let mut b = [0u8; 16];
        b.copy_from_slice(bytes("31441a90000000000000000000000701"));
        encrypt_block(&t, &keys, &mut b);
        assert_eq!(&b, bytes("a255dd8cdacf01948d3a848c3c7fee23"));
        b.copy_from_slice(bytes("09be054a000000000000000000000704"));
        encrypt_block(&t, &keys, &mut b);
        assert_eq!(&b, bytes("b334357cfdf81e3fafe180154eaf7378"));
    }

    #[test]
    fn draft_encryption_example() {
        // Section "Encryption Example". Its step 10 XORs with 0xb3e4357c where
        // the AES output it prints starts 0xb334357c; the printed result
        // (0x67947d2c) is the XOR with 0xb334357c, and so is ours.
        let sid = bytes("31441a");
        let nonce = bytes("9c69c275");
        let cfg = config(
            0,
            sid,
            nonce,
            CidMode::Encrypted,
            "fdf726a9893ec05c0632d3956680baf0",
        );
        roundtrip(&cfg, sid, nonce, bytes("0767947d29be054a"));
    }

    #[test]
    fn draft_unencrypted_vector() {
        let sid = bytes("c4605e");
        let nonce = bytes("4504cc4f");
        let cfg = config(0, sid, nonce, CidMode::Plaintext, "");
        roundtrip(&cfg, sid, nonce, bytes("07c4605e4504cc4f"));
    }

    // The draft's second unencrypted vector (cr_bits 1, sid 350d28b420,
    // nonce 3487d970b, cid 20a350d28b4203487d970b) is inconsistent: the nonce
    // has 9 hex digits (4.5 bytes), and the CID's first octet 0x20 says length
    // 0 where 0x2a (1 << 5 | 10) would follow from the rest. Not tested as
    // printed; the nearest consistent reading is below.
    #[test]
    fn draft_unencrypted_vector_two_as_meant() {
        let sid = bytes("350d28b420");
        let nonce = bytes("3487d970");
        let cfg = config(1, sid, nonce, CidMode::Plaintext, "");
        roundtrip(&cfg, sid, nonce, bytes("29350d28b4203487d970"));
    }

    const DRAFT_KEY: &str = "8f95f09245765f80256934e50c66207f";

    #[test]
    fn draft_encrypted_vector_0_three_passes() {
        let sid = bytes("ed793a");
        let nonce = bytes("ee080dbf");
        let cfg = config(0, sid, nonce, CidMode::Encrypted, DRAFT_KEY);
        roundtrip(&cfg, sid, nonce, bytes("0720b1d07b359d3c"));
    }

    #[test]
    fn draft_encrypted_vector_1_four_passes() {
        // Server id longer than the nonce: the load balancer needs pass 1 too.
        let sid = bytes("ed793a51d49b8f5fab65");
        let nonce = bytes("ee080dbf48");
        let cfg = config(1, sid, nonce, CidMode::Encrypted, DRAFT_KEY);
        roundtrip(&cfg, sid, nonce, bytes("2fcc381bc74cb4fbad2823a3d1f8fed2"));
    }

    #[test]
    fn draft_encrypted_vector_2_single_pass() {
        let sid = bytes("ed793a51d49b8f5f");
        let nonce = bytes("ee080dbf48c0d1e5");
        let cfg = config(2, sid, nonce, CidMode::Encrypted, DRAFT_KEY);
        roundtrip(
            &cfg,
            sid,
            nonce,
            bytes("504dd2d05a7b0de9b2b9907afb5ecf8cc3"),
        );
    }

    // The draft prints this vector's CID as 125779c9...: its first octet 0x12
    // says config 0, length 18, not cr_bits 3 (0x72). The 18 bytes after it
    // are what AES gives; the first octet is no input to the cipher, so the
    // printed CID also decodes under config 0.
    #[test]
    fn draft_encrypted_vector_3_even_four_passes() {
        let sid = bytes("ed793a51d49b8f5fab");
        let nonce = bytes("ee080dbf48c0d1e55d");
        let cfg = config(3, sid, nonce, CidMode::Encrypted, DRAFT_KEY);
        roundtrip(
            &cfg,
            sid,
            nonce,
            bytes("725779c9cc86beb3a3a4a3ca96fce4bfe0cdbc"),
        );
        let as_printed = config(0, sid, nonce, CidMode::Encrypted, DRAFT_KEY);
        roundtrip(
            &as_printed,
            sid,
            nonce,
            bytes("125779c9cc86beb3a3a4a3ca96fce4bfe0cdbc"),
        );
    }

    #[test]
    fn decode_rejects_unroutable_other_config_and_short() {
        let sid = bytes("c4605e");
        let nonce = bytes("4504cc4f");
        let cfg = config(0, sid, nonce, CidMode::Plaintext, "");
        let mut got = [0u8; 3];
        assert_eq!(
            cfg.decode(bytes("e7c4605e4504cc4f"), &mut got),
            Err(CidError::Unroutable)
        );
        assert_eq!(
            cfg.decode(bytes("27c4605e4504cc4f"), &mut got),
            Err(CidError::OtherConfig(1))
        );
        assert_eq!(
            cfg.decode(bytes("07c4605e4504cc"), &mut got),
            Err(CidError::TooShort { len: 7, need: 8 })
        );
        assert_eq!(
            cfg.decode(&[], &mut got),
            Err(CidError::TooShort { len: 0, need: 8 })
        );
        // Bytes a server appends after the nonce are ignored.
        cfg.decode(bytes("07c4605e4504cc4fabcd"), &mut got).unwrap();
        assert_eq!(&got, sid);
    }

    #[test]
    fn check_enforces_the_draft_limits() {
        let ok = CidConfig {
            config_id: 6,
            server_id_len: 15,
            nonce_len: 4,
            mode: CidMode::Plaintext,
            key: [0; 16],
        };
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(ok.cid_len(), 20);
        let bad = |f: fn(&mut CidConfig)| {
            let mut c = ok;
            f(&mut c);
            c.check()
        };
        assert_eq!(bad(|c| c.config_id = 7), Err(CidConfigError::ConfigId(7)));
        assert_eq!(
            bad(|c| c.server_id_len = 0),
            Err(CidConfigError::ServerIdLen(0))
        );
        assert_eq!(
            bad(|c| c.server_id_len = 16),
            Err(CidConfigError::ServerIdLen(16))
        );
        assert_eq!(bad(|c| c.nonce_len = 3), Err(CidConfigError::NonceLen(3)));
        assert_eq!(
            bad(|c| {
                c.server_id_len = 2;
                c.nonce_len = 19;
            }),
            Err(CidConfigError::NonceLen(19))
        );
        assert_eq!(
            bad(|c| c.nonce_len = 5),
            Err(CidConfigError::TooLong {
                server_id_len: 15,
                nonce_len: 5
            })
        );
    }

    #[test]
    fn every_length_roundtrips_in_both_modes() {
        let key = "00112233445566778899aabbccddeeff";
        for sid_len in 1..=15u8 {
            for nonce_len in 4..=18u8 {
                if sid_len + nonce_len > 19 {
                    continue;
                }
                for mode in [CidMode::Plaintext, CidMode::Encrypted] {
                    let sid: std::vec::Vec<u8> =
                        (0..sid_len).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
                    let nonce: std::vec::Vec<u8> =
                        (0..nonce_len).map(|i| i.wrapping_mul(91) ^ 0x3c).collect();
                    let cfg = config(5, &sid, &nonce, mode, key);
                    let mut out = [0u8; MAX_CID_LEN];
                    let n = cfg.encode(&sid, &nonce, &mut out).unwrap();
                    assert_eq!(n, cfg.cid_len());
                    assert_eq!(out[0], 5 << 5 | (sid_len + nonce_len));
                    if mode == CidMode::Encrypted {
                        assert_ne!(&out[1..1 + sid.len()], &sid[..], "{sid_len}+{nonce_len}");
                    }
                    let mut got = [0u8; 16];
                    cfg.decode(&out[..n], &mut got[..sid.len()]).unwrap();
                    assert_eq!(
                        &got[..sid.len()],
                        &sid[..],
                        "{mode:?} {sid_len}+{nonce_len}"
                    );
                }
            }
        }
    }
}
