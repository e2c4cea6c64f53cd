//! Fixed newstyle negotiation: from the server greeting to the start of the
//! transmission phase, or to the client's goodbye.
//!
//! Invariants:
//! - Every option except `NBD_OPT_EXPORT_NAME` and a successful `NBD_OPT_GO`
//!   gets replies ending in exactly one final reply (`ACK` or an error), so a
//!   client never loses sync; unknown options get `NBD_REP_ERR_UNSUP`.
//! - Option data is read whole only up to [`OPTION_DATA_MAX`]; larger data
//!   is discarded without being buffered and answered `NBD_REP_ERR_TOO_BIG`.
//! - Each step (the client flags, one option and its reply) must finish
//!   within the configured handshake timeout, and shutdown ends the
//!   negotiation at the next option boundary.
//! - Parsing goes through [`Cursor`], so no client input can index out of
//!   bounds.

use std::sync::Arc;
use std::time::Duration;

use block_api::{BlockError, BlockVolume, VolumeProvider};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::NbdError;
use crate::proto::*;

/// Largest option payload read into memory (a legitimate one is a name, a
/// few info requests or a few context queries: well under this).
pub const OPTION_DATA_MAX: usize = 64 << 10;

/// The metadata context id this server gives `base:allocation`.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What negotiation agreed on for the transmission phase.
pub(crate) struct Negotiated {
    pub volume: Arc<dyn BlockVolume>,
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
}

pub(crate) enum Outcome {
    Transmission(Negotiated),
    /// The client aborted or went away between options.
    Closed,
}

/// Transmission flags of every export (all are read-write today).
pub(crate) fn transmission_flags(structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_SEND_FAST_ZERO
        | FLAG_SEND_CACHE
        | FLAG_CAN_MULTI_CONN;
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

/// Run the negotiation on a fresh connection.
pub(crate) async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    provider: &dyn VolumeProvider,
    step_timeout: Duration,
    shutdown: &CancellationToken,
) -> Result<Outcome, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 18];
    greeting[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    let step = Step {
        timeout: step_timeout,
        shutdown,
    };
    let Some(()) = step.run(write_and_flush(wr, &greeting)).await? else {
        return Ok(Outcome::Closed);
    };

    let Some(client_flags) = step.run(rd.read_u32()).await? else {
        return Ok(Outcome::Closed);
    };
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::UnknownClientFlags(client_flags));
    }

    let mut haggle = Haggle {
        provider,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta_export: None,
        out: Vec::with_capacity(256),
        data: Vec::new(),
    };
    loop {
        let mut header = [0u8; OPTION_HEADER_LEN];
        match step.run(rd.read_exact(&mut header)).await {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(Outcome::Closed),
            Err(NbdError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(Outcome::Closed);
            }
            Err(e) => return Err(e),
        }
        let magic = u64::from_be_bytes(header[0..8].try_into().unwrap_or_default());
        if magic != IHAVEOPT {
            return Err(NbdError::BadMagic {
                expected: "IHAVEOPT option",
                magic,
            });
        }
        let option = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
        let len = u32::from_be_bytes([header[12], header[13], header[14], header[15]]) as usize;

        let oversized = len > OPTION_DATA_MAX;
        if oversized && option == OPT_EXPORT_NAME {
            // No error reply exists for EXPORT_NAME: hang up without reading it.
            return Err(NbdError::ExportNameRefused {
                name: String::new(),
                reason: format!("option data of {len} bytes"),
            });
        }
        let Some(()) = step
            .run(async {
                if oversized {
                    discard(rd, len as u64).await
                } else {
                    haggle.data.resize(len, 0);
                    rd.read_exact(&mut haggle.data).await.map(|_| ())
                }
            })
            .await?
        else {
            return Ok(Outcome::Closed);
        };

        let action = if oversized {
            haggle.error(
                option,
                REP_ERR_TOO_BIG,
                &format!("option data of {len} bytes"),
            );
            Action::Continue
        } else {
            haggle.option(option).await?
        };

        let out = std::mem::take(&mut haggle.out);
        let Some(()) = step.run(write_and_flush(wr, &out)).await? else {
            return Ok(Outcome::Closed);
        };
        haggle.out = out;
        haggle.out.clear();
        match action {
            Action::Continue => {}
            Action::Close => return Ok(Outcome::Closed),
            Action::Transmit(negotiated) => return Ok(Outcome::Transmission(negotiated)),
        }
    }
}

async fn write_and_flush<W: AsyncWrite + Unpin>(wr: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    wr.write_all(bytes).await?;
    wr.flush().await
}

/// One bounded step of the negotiation.
struct Step<'a> {
    timeout: Duration,
    shutdown: &'a CancellationToken,
}

impl Step<'_> {
    /// `Ok(None)` when the server is shutting down.
    async fn run<T>(
        &self,
        fut: impl Future<Output = std::io::Result<T>>,
    ) -> Result<Option<T>, NbdError> {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Ok(None),
            r = tokio::time::timeout(self.timeout, fut) => match r {
                Ok(Ok(v)) => Ok(Some(v)),
                Ok(Err(e)) => Err(NbdError::Io(e)),
                Err(_) => Err(NbdError::HandshakeTimeout(self.timeout)),
            },
        }
    }
}

/// Read and drop `len` bytes without buffering them.
pub(crate) async fn discard<R: AsyncRead + Unpin>(rd: &mut R, mut len: u64) -> std::io::Result<()> {
    let mut scratch = [0u8; 8192];
    while len > 0 {
        let n = len.min(scratch.len() as u64) as usize;
        rd.read_exact(&mut scratch[..n]).await?;
        len -= n as u64;
    }
    Ok(())
}

enum Action {
    Continue,
    Close,
    Transmit(Negotiated),
}

/// State of the option haggling.
struct Haggle<'a> {
    provider: &'a dyn VolumeProvider,
    no_zeroes: bool,
    structured: bool,
    /// Export name of the last `SET_META_CONTEXT` that selected
    /// `base:allocation` (cleared by every `SET_META_CONTEXT`).
    meta_export: Option<Vec<u8>>,
    /// Replies to send for the current option.
    out: Vec<u8>,
    /// Data of the current option.
    data: Vec<u8>,
}

impl Haggle<'_> {
    async fn option(&mut self, option: u32) -> Result<Action, NbdError> {
        match option {
            OPT_EXPORT_NAME => self.export_name().await,
            OPT_ABORT => {
                self.reply(option, REP_ACK, &[]);
                Ok(Action::Close)
            }
            OPT_LIST => {
                self.list().await;
                Ok(Action::Continue)
            }
            OPT_INFO | OPT_GO => self.info_or_go(option).await,
            OPT_STRUCTURED_REPLY => {
                if self.data.is_empty() {
                    self.structured = true;
                    self.reply(option, REP_ACK, &[]);
                } else {
                    self.error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY carries no data",
                    );
                }
                Ok(Action::Continue)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option).await;
                Ok(Action::Continue)
            }
            OPT_STARTTLS => {
                self.error(option, REP_ERR_UNSUP, "this server does not offer TLS");
                Ok(Action::Continue)
            }
            _ => {
                self.error(
                    option,
                    REP_ERR_UNSUP,
                    &format!("option {option} is not supported"),
                );
                Ok(Action::Continue)
            }
        }
    }

    /// The old way into transmission: no error reply is possible, so a
    /// refusal ends the session.
    async fn export_name(&mut self) -> Result<Action, NbdError> {
        let name = String::from_utf8_lossy(&self.data).into_owned();
        let refused = |reason: String| NbdError::ExportNameRefused {
            name: name.clone(),
            reason,
        };
        if self.data.len() > STRING_MAX || std::str::from_utf8(&self.data).is_err() {
            return Err(refused("not a valid export name".into()));
        }
        let volume = open_export(self.provider, &name)
            .await
            .map_err(|(_, msg)| refused(msg))?;
        let structured = self.structured;
        self.out.extend_from_slice(&volume.size().to_be_bytes());
        self.out
            .extend_from_slice(&transmission_flags(structured).to_be_bytes());
        if !self.no_zeroes {
            self.out.extend_from_slice(&[0u8; 124]);
        }
        let base_allocation = self.meta_export.as_deref() == Some(self.data.as_slice());
        Ok(Action::Transmit(Negotiated {
            volume,
            structured,
            base_allocation,
        }))
    }

    async fn list(&mut self) {
        if !self.data.is_empty() {
            self.error(OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST carries no data");
            return;
        }
        for volume in self.provider.list().await {
            let name = volume.name.as_bytes();
            if name.len() > STRING_MAX {
                continue;
            }
            let mut payload = Vec::with_capacity(4 + name.len());
            payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
            payload.extend_from_slice(name);
            self.reply(OPT_LIST, REP_SERVER, &payload);
        }
        self.reply(OPT_LIST, REP_ACK, &[]);
    }

    async fn info_or_go(&mut self, option: u32) -> Result<Action, NbdError> {
        let data = std::mem::take(&mut self.data);
        let action = self.info_or_go_with(option, &data).await;
        self.data = data;
        Ok(action)
    }

    async fn info_or_go_with(&mut self, option: u32, data: &[u8]) -> Action {
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string()?;
            let count = c.u16()? as usize;
            let requests = c.bytes(count * 2)?;
            (c.remaining() == 0).then_some((name, requests))
        })();
        let Some((name_bytes, requests)) = parsed else {
            self.error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data");
            return Action::Continue;
        };
        let Ok(name) = std::str::from_utf8(name_bytes) else {
            self.error(option, REP_ERR_INVALID, "export name is not UTF-8");
            return Action::Continue;
        };
        let volume = match open_export(self.provider, name).await {
            Ok(v) => v,
            Err((code, msg)) => {
                self.error(option, code, &msg);
                return Action::Continue;
            }
        };

        let mut export = [0u8; 12];
        export[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
        export[2..10].copy_from_slice(&volume.size().to_be_bytes());
        export[10..12].copy_from_slice(&transmission_flags(self.structured).to_be_bytes());
        self.reply(option, REP_INFO, &export);

        // Sent whether asked or not: it is only a hint, unaligned requests work.
        let mut sizes = [0u8; 14];
        sizes[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        sizes[2..6].copy_from_slice(&BLOCK_SIZE_MIN.to_be_bytes());
        sizes[6..10].copy_from_slice(&BLOCK_SIZE_PREFERRED.to_be_bytes());
        sizes[10..14].copy_from_slice(&PAYLOAD_MAX.to_be_bytes());
        self.reply(option, REP_INFO, &sizes);

        let wants_name = requests
            .chunks_exact(2)
            .any(|r| u16::from_be_bytes([r[0], r[1]]) == INFO_NAME);
        let canonical = volume.name().as_bytes();
        if wants_name && canonical.len() <= STRING_MAX {
            let mut info = Vec::with_capacity(2 + canonical.len());
            info.extend_from_slice(&INFO_NAME.to_be_bytes());
            info.extend_from_slice(canonical);
            self.reply(option, REP_INFO, &info);
        }
        self.reply(option, REP_ACK, &[]);

        if option == OPT_GO {
            let base_allocation = self.meta_export.as_deref() == Some(name_bytes);
            Action::Transmit(Negotiated {
                volume,
                structured: self.structured,
                base_allocation,
            })
        } else {
            Action::Continue
        }
    }

    async fn meta_context(&mut self, option: u32) {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // The selection is replaced even when this request fails.
            self.meta_export = None;
        }
        if !self.structured {
            self.error(
                option,
                REP_ERR_INVALID,
                "negotiate NBD_OPT_STRUCTURED_REPLY first",
            );
            return;
        }
        let data = std::mem::take(&mut self.data);
        let Some((name, queries)) = parse_meta_context_request(&data) else {
            self.error(
                option,
                REP_ERR_INVALID,
                "malformed metadata context request",
            );
            self.data = data;
            return;
        };
        let known = match std::str::from_utf8(name) {
            Ok(name) => resolve_export_name(self.provider, name).await.is_ok(),
            Err(_) => false,
        };
        if !known {
            let msg = format!("export {:?} not found", String::from_utf8_lossy(name));
            self.error(option, REP_ERR_UNKNOWN, &msg);
            self.data = data;
            return;
        }
        let base_allocation = CONTEXT_BASE_ALLOCATION.as_bytes();
        let selected = if set {
            queries.contains(&base_allocation)
        } else {
            // An empty list asks for everything; `base:` is the namespace wildcard.
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| *q == base_allocation || *q == b"base:")
        };
        if selected {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            let mut payload = Vec::with_capacity(4 + base_allocation.len());
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(base_allocation);
            self.reply(option, REP_META_CONTEXT, &payload);
            if set {
                self.meta_export = Some(name.to_vec());
            }
        }
        self.reply(option, REP_ACK, &[]);
        self.data = data;
    }

    fn reply(&mut self, option: u32, reply: u32, payload: &[u8]) {
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        self.out
            .extend_from_slice(&option_reply_header(option, reply, len));
        self.out.extend_from_slice(payload);
    }

    fn error(&mut self, option: u32, code: u32, message: &str) {
        tracing::debug!(option, code, message, "option refused");
        let message = truncate(message, STRING_MAX);
        self.reply(option, code, message.as_bytes());
    }
}

/// Export name and queries of a LIST/SET_META_CONTEXT request.
fn parse_meta_context_request(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let mut c = Cursor::new(data);
    let name = c.string()?;
    let count = c.u32()? as usize;
    // Each query takes at least its 4-byte length: bounds the allocation.
    if count > c.remaining() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(c.string()?);
    }
    (c.remaining() == 0).then_some((name, queries))
}

/// The volume name an export name stands for: the empty name is the
/// default export, which exists when exactly one volume is served.
async fn resolve_export_name(
    provider: &dyn VolumeProvider,
    name: &str,
) -> Result<String, (u32, String)> {
    let volumes = provider.list().await;
    let found = if name.is_empty() {
        match volumes.as_slice() {
            [only] => Some(only.name.clone()),
            _ => None,
        }
    } else {
        volumes
            .iter()
            .find(|v| v.name == name)
            .map(|v| v.name.clone())
    };
    found.ok_or_else(|| {
        if name.is_empty() {
            let msg = format!(
                "no default export: name one of the {} volumes",
                volumes.len()
            );
            (REP_ERR_UNKNOWN, msg)
        } else {
            (REP_ERR_UNKNOWN, format!("export {name:?} not found"))
        }
    })
}

async fn open_export(
    provider: &dyn VolumeProvider,
    name: &str,
) -> Result<Arc<dyn BlockVolume>, (u32, String)> {
    let name = if name.is_empty() {
        resolve_export_name(provider, name).await?
    } else {
        name.to_owned()
    };
    provider.open(&name).await.map_err(|e| match e {
        BlockError::NotFound(_) | BlockError::Gone(_) => (REP_ERR_UNKNOWN, e.to_string()),
        other => (
            REP_ERR_UNKNOWN,
            format!("export {name:?} cannot be opened: {other}"),
        ),
    })
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_request_parses_name_and_queries() {
        let d = meta_context_request("vol", &["base:allocation", "qemu:dirty-bitmap:x"]);
        let (name, queries) = parse_meta_context_request(&d).expect("well-formed request");
        assert_eq!(name, b"vol");
        assert_eq!(
            queries,
            vec![&b"base:allocation"[..], &b"qemu:dirty-bitmap:x"[..]]
        );
    }

    #[test]
    fn meta_request_with_trailing_or_missing_bytes_is_rejected() {
        let mut d = meta_context_request("vol", &["base:allocation"]);
        d.push(0);
        assert!(
            parse_meta_context_request(&d).is_none(),
            "trailing byte accepted"
        );
        d.truncate(d.len() - 2);
        assert!(
            parse_meta_context_request(&d).is_none(),
            "short query accepted"
        );
    }

    #[test]
    fn meta_request_with_huge_query_count_is_rejected_without_allocating() {
        let mut d = meta_context_request("vol", &[]);
        let n = d.len();
        d[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_context_request(&d).is_none());
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn df_is_advertised_only_with_structured_replies() {
        assert_eq!(transmission_flags(false) & FLAG_SEND_DF, 0);
        assert_ne!(transmission_flags(true) & FLAG_SEND_DF, 0);
        assert_ne!(transmission_flags(false) & FLAG_CAN_MULTI_CONN, 0);
    }
}
