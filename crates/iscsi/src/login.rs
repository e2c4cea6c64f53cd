//! The login phase (RFC 7143 6.3): security negotiation (CHAP or none),
//! operational negotiation, and the move to full feature phase, for
//! discovery and normal sessions.
//!
//! Invariants: a normal session reaches full feature phase only for a
//! volume the provider can open and, when the target has CHAP configured,
//! only after the initiator proved the secret; every failure is answered
//! with a Login Response carrying the RFC status class/detail before the
//! connection closes; continued (C bit) text is capped at
//! [`LOGIN_TEXT_MAX`] bytes.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::chap::ChapExchange;
use crate::config::volume_of_iqn;
use crate::error::IscsiError;
use crate::params::{self, KeyClass, SessionParams};
use crate::pdu::{Bhs, InitiatorOp, Pdu, TargetOp};
use crate::registry::Registry;
use crate::scsi::lu::LogicalUnit;
use crate::text::{self, find};
use crate::wire::{self, WireLimits};

/// Most bytes of key=value text one login exchange may accumulate.
pub const LOGIN_TEXT_MAX: usize = 64 * 1024;
/// Most login request PDUs one login may take.
const LOGIN_PDUS_MAX: usize = 64;

/// What kind of session the login produced.
pub enum SessionKind {
    Discovery,
    Normal { lu: Arc<LogicalUnit> },
}

/// A completed login.
pub struct LoginOutcome {
    pub kind: SessionKind,
    pub initiator_name: String,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub session_id: u64,
    pub params: SessionParams,
    /// StatSN of the next status-bearing PDU.
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
}

/// Login status class and detail (RFC 7143 11.13.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginStatus(pub u8, pub u8);

impl LoginStatus {
    pub const INITIATOR_ERROR: Self = Self(0x02, 0x00);
    pub const AUTH_FAILURE: Self = Self(0x02, 0x01);
    pub const NOT_FOUND: Self = Self(0x02, 0x03);
    pub const UNSUPPORTED_VERSION: Self = Self(0x02, 0x05);
    pub const MISSING_PARAMETER: Self = Self(0x02, 0x07);
    pub const SESSION_NOT_FOUND: Self = Self(0x02, 0x0a);
    pub const TARGET_ERROR: Self = Self(0x03, 0x00);
}

struct Failure(LoginStatus, String);

const STAGE_SECURITY: u8 = 0;
const STAGE_OPERATIONAL: u8 = 1;
const STAGE_FULL_FEATURE: u8 = 3;

struct Login<'a> {
    registry: &'a Arc<Registry>,
    params: SessionParams,
    stage: u8,
    initiator_name: Option<String>,
    discovery: bool,
    lu: Option<Arc<LogicalUnit>>,
    isid: [u8; 6],
    itt: u32,
    cmd_sn: u32,
    stat_sn: u32,
    /// CHAP required for this target (None = no authentication).
    chap: Option<ChapExchange>,
    /// Secrets of the target, until AuthMethod=CHAP starts the exchange.
    pending_secrets: Option<crate::chap::ChapSecrets>,
    chap_required: bool,
    auth_done: bool,
    declared: bool,
    tpgt_sent: bool,
    first: bool,
}

/// Run the login on `stream`. Returns the outcome once the final login
/// response was written.
pub async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    registry: &Arc<Registry>,
    parent: &tokio_util::sync::CancellationToken,
) -> Result<(LoginOutcome, Option<crate::registry::SessionGuard>), IscsiError> {
    let limits = WireLimits::login(LOGIN_TEXT_MAX as u32);
    let mut st = Login {
        registry,
        params: SessionParams::defaults(&registry.config.limits),
        stage: STAGE_SECURITY,
        initiator_name: None,
        discovery: false,
        lu: None,
        isid: [0; 6],
        itt: 0,
        cmd_sn: 0,
        stat_sn: 0,
        chap: None,
        pending_secrets: None,
        chap_required: false,
        auth_done: false,
        declared: false,
        tpgt_sent: false,
        first: true,
    };
    let mut pending = Vec::new();
    for _ in 0..LOGIN_PDUS_MAX {
        let pdu = wire::read_pdu(stream, &limits).await?;
        if InitiatorOp::from_code(pdu.bhs.opcode()) != Some(InitiatorOp::Login) {
            return Err(IscsiError::Login(format!(
                "opcode {:#x} during login",
                pdu.bhs.opcode()
            )));
        }
        if pending.len() + pdu.data.len() > LOGIN_TEXT_MAX {
            let resp = st.failure_response(&pdu.bhs, LoginStatus::INITIATOR_ERROR);
            wire::write_pdu(stream, &resp, &limits).await?;
            return Err(IscsiError::Login("login text too long".into()));
        }
        pending.extend_from_slice(&pdu.data);
        let cont = pdu.bhs.flags() & 0x40 != 0;
        if cont {
            // More text follows: acknowledge with an empty response.
            let resp = st.response(&pdu.bhs, false, Vec::new());
            wire::write_pdu(stream, &resp, &limits).await?;
            continue;
        }
        let data = std::mem::take(&mut pending);
        match st.step(&pdu.bhs, &data).await {
            Ok((mut resp, done)) => {
                if done {
                    let (outcome, guard) = st.finish(parent)?;
                    resp.bhs.set_u16_at(14, outcome.tsih);
                    wire::write_pdu(stream, &resp, &limits).await?;
                    return Ok((outcome, guard));
                }
                wire::write_pdu(stream, &resp, &limits).await?;
            }
            Err(Failure(status, why)) => {
                let resp = st.failure_response(&pdu.bhs, status);
                wire::write_pdu(stream, &resp, &limits).await?;
                return Err(IscsiError::Login(why));
            }
        }
    }
    Err(IscsiError::Login("too many login PDUs".into()))
}

impl Login<'_> {
    fn response(&mut self, req: &Bhs, transit: bool, data: Vec<u8>) -> Pdu {
        let mut b = Bhs::target(TargetOp::LoginResponse);
        let csg = (req.flags() >> 2) & 0x03;
        let nsg = req.flags() & 0x03;
        let mut flags = csg << 2;
        if transit {
            flags |= 0x80 | nsg;
        }
        b.set_flags(flags);
        b.0[2] = 0; // version-max
        b.0[3] = 0; // version-active
        b.0[8..14].copy_from_slice(&self.isid);
        b.set_itt(req.itt());
        b.set_stat_sn(self.stat_sn);
        self.stat_sn = self.stat_sn.wrapping_add(1);
        b.set_exp_cmd_sn(self.cmd_sn);
        b.set_max_cmd_sn(
            self.cmd_sn
                .wrapping_add(self.registry.config.cmd_window - 1),
        );
        Pdu::with_data(b, data)
    }

    fn failure_response(&mut self, req: &Bhs, status: LoginStatus) -> Pdu {
        let mut p = self.response(req, false, Vec::new());
        p.bhs.set_flags(0);
        p.bhs.0[36] = status.0;
        p.bhs.0[37] = status.1;
        p
    }

    async fn step(&mut self, req: &Bhs, data: &[u8]) -> Result<(Pdu, bool), Failure> {
        let flags = req.flags();
        let transit = flags & 0x80 != 0;
        let csg = (flags >> 2) & 0x03;
        let nsg = flags & 0x03;
        if req.0[3] > 0 {
            // version-min above the only version there is.
            return Err(Failure(LoginStatus::UNSUPPORTED_VERSION, "version".into()));
        }
        let keys = text::parse(data)
            .map_err(|e| Failure(LoginStatus::INITIATOR_ERROR, format!("login text: {e}")))?;
        if self.first {
            self.first = false;
            self.isid.copy_from_slice(&req.0[8..14]);
            self.itt = req.itt();
            self.cmd_sn = req.cmd_sn();
            self.stat_sn = req.exp_stat_sn();
            if req.u16_at(14) != 0 {
                // Adding a connection to an existing session: MaxConnections=1.
                return Err(Failure(LoginStatus::SESSION_NOT_FOUND, "TSIH != 0".into()));
            }
            self.first_keys(&keys).await?;
            if csg != STAGE_SECURITY {
                if self.chap_required {
                    return Err(Failure(
                        LoginStatus::AUTH_FAILURE,
                        "authentication skipped".into(),
                    ));
                }
                self.auth_done = true;
                self.stage = csg;
            }
        } else if req.itt() != self.itt {
            return Err(Failure(LoginStatus::INITIATOR_ERROR, "ITT changed".into()));
        }
        if csg != self.stage || csg == 2 || csg == STAGE_FULL_FEATURE {
            return Err(Failure(
                LoginStatus::INITIATOR_ERROR,
                format!("bad CSG {csg}"),
            ));
        }
        let mut out: Vec<(String, String)> = Vec::new();
        let mut auth_keys = Vec::new();
        for (k, v) in &keys {
            match params::classify(k) {
                KeyClass::Operational => {
                    if let Some(a) =
                        params::negotiate_key(&mut self.params, &self.registry.config.limits, k, v)
                    {
                        out.push((k.clone(), a));
                    }
                }
                KeyClass::Login => match k.as_str() {
                    "AuthMethod" => {
                        if csg != STAGE_SECURITY {
                            out.push((k.clone(), "Reject".into()));
                            continue;
                        }
                        let answer = self.auth_method(v)?;
                        out.push((k.clone(), answer));
                    }
                    k2 if k2.starts_with("CHAP_") => auth_keys.push((k.clone(), v.clone())),
                    "SendTargets" | "TargetAddress" | "TargetPortalGroupTag" | "TargetAlias" => {
                        out.push((k.clone(), "Reject".into()));
                    }
                    _ => {}
                },
                KeyClass::Unknown => out.push((k.clone(), "NotUnderstood".into())),
            }
        }
        if !auth_keys.is_empty() {
            let Some(chap) = self.chap.as_mut() else {
                return Err(Failure(
                    LoginStatus::AUTH_FAILURE,
                    "CHAP keys without CHAP".into(),
                ));
            };
            let answer = chap
                .step(&auth_keys)
                .map_err(|e| Failure(LoginStatus::AUTH_FAILURE, format!("CHAP: {e}")))?;
            out.extend(answer);
            if chap.done() {
                self.auth_done = true;
            }
        }
        if !self.tpgt_sent && !self.discovery {
            // RFC 7143 13.9: in the first login response of a normal session.
            self.tpgt_sent = true;
            out.push(("TargetPortalGroupTag".into(), "1".into()));
        }
        let mut can_transit = transit;
        if transit && csg == STAGE_SECURITY && !self.auth_done {
            if self.chap.is_some() {
                // Mid-exchange: stay in the security stage.
                can_transit = false;
            } else if self.chap_required {
                return Err(Failure(
                    LoginStatus::AUTH_FAILURE,
                    "no authentication".into(),
                ));
            } else {
                self.auth_done = true;
            }
        }
        if can_transit && (nsg == 2 || nsg <= csg) {
            return Err(Failure(
                LoginStatus::INITIATOR_ERROR,
                format!("bad NSG {nsg}"),
            ));
        }
        let entering_ffp = can_transit && nsg == STAGE_FULL_FEATURE;
        if (entering_ffp || (can_transit && nsg == STAGE_OPERATIONAL) || csg == STAGE_OPERATIONAL)
            && !self.declared
        {
            self.declared = true;
            out.push((
                "MaxRecvDataSegmentLength".into(),
                self.params.target_max_recv_data_segment_len.to_string(),
            ));
        }
        if can_transit {
            self.stage = nsg;
        }
        params::finish(&mut self.params);
        let resp = self.response(req, can_transit, text::encode(&out));
        Ok((resp, entering_ffp))
    }

    async fn first_keys(&mut self, keys: &[(String, String)]) -> Result<(), Failure> {
        let name = find(keys, "InitiatorName")
            .ok_or_else(|| Failure(LoginStatus::MISSING_PARAMETER, "no InitiatorName".into()))?;
        if name.is_empty() || name.len() > 223 {
            return Err(Failure(
                LoginStatus::INITIATOR_ERROR,
                "bad InitiatorName".into(),
            ));
        }
        self.initiator_name = Some(name.to_string());
        match find(keys, "SessionType").unwrap_or("Normal") {
            "Discovery" => {
                self.discovery = true;
                if let Some(s) = &self.registry.config.discovery_chap {
                    self.chap_required = true;
                    self.pending_secrets = Some(s.clone());
                }
            }
            "Normal" => {
                let target = find(keys, "TargetName").ok_or_else(|| {
                    Failure(LoginStatus::MISSING_PARAMETER, "no TargetName".into())
                })?;
                let volume = volume_of_iqn(target)
                    .ok_or_else(|| Failure(LoginStatus::NOT_FOUND, target.to_string()))?;
                let lu = self.registry.logical_unit(volume).await.map_err(|e| {
                    let status = match e {
                        block_api::BlockError::NotFound(_) => LoginStatus::NOT_FOUND,
                        _ => LoginStatus::TARGET_ERROR,
                    };
                    Failure(status, format!("target {target}: {e}"))
                })?;
                if let Some(s) = self.registry.config.chap.secrets(volume) {
                    self.chap_required = true;
                    self.pending_secrets = Some(s);
                }
                self.lu = Some(lu);
            }
            other => {
                return Err(Failure(
                    LoginStatus::INITIATOR_ERROR,
                    format!("SessionType {other}"),
                ));
            }
        }
        Ok(())
    }

    fn auth_method(&mut self, offer: &str) -> Result<String, Failure> {
        let offers: Vec<&str> = offer.split(',').map(str::trim).collect();
        if self.chap_required {
            if !offers.contains(&"CHAP") {
                return Err(Failure(LoginStatus::AUTH_FAILURE, "CHAP required".into()));
            }
            if let Some(s) = self.pending_secrets.take() {
                self.chap = Some(ChapExchange::new(s));
            }
            Ok("CHAP".into())
        } else if offers.contains(&"None") {
            self.auth_done = true;
            Ok("None".into())
        } else {
            Err(Failure(
                LoginStatus::AUTH_FAILURE,
                "no acceptable AuthMethod".into(),
            ))
        }
    }

    fn finish(
        self,
        parent: &tokio_util::sync::CancellationToken,
    ) -> Result<(LoginOutcome, Option<crate::registry::SessionGuard>), IscsiError> {
        let initiator_name = self
            .initiator_name
            .ok_or_else(|| IscsiError::Login("no InitiatorName".into()))?;
        let port = crate::reservation::InitiatorPort {
            name: initiator_name.clone(),
            isid: self.isid,
        };
        let (kind, guard) = match self.lu {
            Some(lu) => {
                let g = self
                    .registry
                    .register_session(port, lu.name.clone(), parent);
                (SessionKind::Normal { lu }, Some(g))
            }
            None => (SessionKind::Discovery, None),
        };
        let session_id = guard.as_ref().map_or(0, |g| g.id);
        Ok((
            LoginOutcome {
                kind,
                initiator_name,
                isid: self.isid,
                tsih: self.registry.tsih(session_id),
                session_id,
                params: self.params,
                stat_sn: self.stat_sn,
                exp_cmd_sn: self.cmd_sn,
            },
            guard,
        ))
    }
}
