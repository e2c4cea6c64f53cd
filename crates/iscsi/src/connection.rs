//! One connection from accept to close: login, then the full feature phase
//! loop that owns all per-session state — the CmdSN window, the table of
//! tasks (collecting write data via immediate/unsolicited data and R2T, or
//! executing), task management, NOP keepalive, text requests and logout.
//!
//! Shape: a reader task turns the socket into PDUs on a bounded channel; a
//! writer task (see `writer`) sends; this loop alone mutates session state
//! and spawns one task per SCSI command, which reports back on a bounded
//! channel. Invariants: at most `cmd_window` non-immediate commands are
//! outstanding (MaxCmdSN never grows past that), immediate ones at most as
//! many again; write buffers are sized by the expected transfer length,
//! which is capped before allocation; a Data-Out that breaks ordering or
//! limits ends the connection (error recovery level 0); an aborted task's
//! response is never sent; on shutdown running commands finish first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use block_api::AlignedBuf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::TargetConfig;
use crate::discovery;
use crate::error::IscsiError;
use crate::login::{self, LoginOutcome, SessionKind};
use crate::params::SessionParams;
use crate::pdu::{
    Bhs, InitiatorOp, Pdu, RESERVED_TAG, RejectReason, TargetOp, decode_lun, sn_le, sn_lt,
};
use crate::registry::Registry;
use crate::reservation::InitiatorPort;
use crate::scsi::lu::LogicalUnit;
use crate::scsi::sense::Sense;
use crate::scsi::{self, Nexus, ScsiResponse, cdb, opcodes};
use crate::text;
use crate::wire::{self, WireError, WireLimits};
use crate::writer::{DataInLimits, Outgoing, Residual, ScsiDone, StatMode, Window, Writer};

/// PDUs buffered between the reader task and the loop.
const INBOUND_QUEUE: usize = 16;
/// Longest text (SendTargets) request accepted across continuations.
const TEXT_MAX: usize = 64 * 1024;

/// Serve one accepted connection until it closes.
pub async fn run(
    mut sock: TcpStream,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<(), IscsiError> {
    let _ = sock.set_nodelay(true);
    let cfg = registry.config.clone();
    let local = sock.local_addr()?;
    let login = tokio::select! {
        r = tokio::time::timeout(cfg.login_timeout, login::login(&mut sock, &registry, &shutdown)) => {
            r.map_err(|_| IscsiError::Timeout("login"))??
        }
        _ = shutdown.cancelled() => return Ok(()),
    };
    let (outcome, guard) = login;
    let cancel = guard
        .as_ref()
        .map_or_else(|| shutdown.child_token(), |g| g.cancel.clone());
    let portal = cfg.portal.unwrap_or(local);
    let res = full_feature(sock, registry, outcome, cancel, shutdown, portal).await;
    drop(guard);
    res
}

enum TaskState {
    /// Waiting for write data.
    Collecting(Box<WriteTask>),
    /// Executing; `aborted` suppresses its response.
    Running { aborted: bool },
}

struct WriteTask {
    lun: [u8; 8],
    cdb: Vec<u8>,
    edtl: u32,
    read: bool,
    buf: AlignedBuf,
    received: u32,
    /// Unsolicited data may arrive up to this offset.
    unsolicited_end: u32,
    /// Expected DataSN within the current sequence.
    data_sn: u32,
    /// The outstanding R2T: (TTT, end offset).
    r2t: Option<(u32, u32)>,
    next_r2t_sn: u32,
}

/// A task management or logout response waiting for running tasks.
struct Deferred {
    waiting: Vec<u32>,
    pdu: Pdu,
    close_after: bool,
}

struct Completion {
    itt: u32,
    done: Box<ScsiDone>,
}

struct Session {
    cfg: Arc<TargetConfig>,
    params: SessionParams,
    lu: Option<Arc<LogicalUnit>>,
    nexus: Nexus,
    portal: std::net::SocketAddr,
    registry: Arc<Registry>,
    out: mpsc::Sender<Outgoing>,
    done_tx: mpsc::Sender<Completion>,
    window: Arc<Window>,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    tasks: HashMap<u32, TaskState>,
    /// Buffer bytes each task may hold (write buffer or read data), so the
    /// connection's total stays under the budget.
    charged: HashMap<u32, u64>,
    charged_total: u64,
    /// Non-immediate commands that arrived ahead of ExpCmdSN.
    held: BTreeMap<u32, Pdu>,
    next_ttt: u32,
    deferred: Vec<Deferred>,
    /// Pending text response continuation: (TTT, remaining bytes).
    text_out: Option<(u32, Vec<u8>)>,
    text_in: Vec<u8>,
    closing: bool,
}

async fn full_feature(
    sock: TcpStream,
    registry: Arc<Registry>,
    o: LoginOutcome,
    cancel: CancellationToken,
    shutdown: CancellationToken,
    portal: std::net::SocketAddr,
) -> Result<(), IscsiError> {
    let cfg = registry.config.clone();
    let p = o.params;
    let wire_limits = WireLimits {
        header_digest: p.header_digest,
        data_digest: p.data_digest,
        max_recv_data_segment_len: p.target_max_recv_data_segment_len,
    };
    let (rd, wr) = sock.into_split();
    let window = Arc::new(Window::default());
    let window_size = cfg.cmd_window;
    let max_cmd_sn = o.exp_cmd_sn.wrapping_add(window_size - 1);
    window.exp_cmd_sn.store(o.exp_cmd_sn, Ordering::Release);
    window.max_cmd_sn.store(max_cmd_sn, Ordering::Release);
    let (out_tx, out_rx) = mpsc::channel(window_size as usize * 2 + 16);
    let writer = Writer::new(
        wr,
        o.stat_sn,
        window.clone(),
        wire_limits,
        DataInLimits {
            max_segment: p.initiator_max_recv_data_segment_len,
            max_burst: p.max_burst_len,
        },
    );
    let writer_task = tokio::spawn(writer.run(out_rx));
    let (in_tx, mut in_rx) = mpsc::channel::<Result<Pdu, WireError>>(INBOUND_QUEUE);
    let reader_task = tokio::spawn(async move {
        let mut rd = rd;
        loop {
            let r = wire::read_pdu(&mut rd, &wire_limits).await;
            let stop = r.is_err();
            if in_tx.send(r).await.is_err() || stop {
                return;
            }
        }
    });
    let (done_tx, mut done_rx) = mpsc::channel(window_size as usize * 2 + 4);
    let lu = match o.kind {
        SessionKind::Normal { lu } => Some(lu),
        SessionKind::Discovery => None,
    };
    let port = InitiatorPort {
        name: o.initiator_name.clone(),
        isid: o.isid,
    };
    if let Some(lu) = &lu {
        lu.nexus_joined(&port);
    }
    let mut s = Session {
        cfg: cfg.clone(),
        params: p,
        lu,
        nexus: Nexus {
            port: port.clone(),
            target_port: 1,
        },
        portal,
        registry,
        out: out_tx,
        done_tx,
        window,
        exp_cmd_sn: o.exp_cmd_sn,
        max_cmd_sn,
        tasks: HashMap::new(),
        charged: HashMap::new(),
        charged_total: 0,
        held: BTreeMap::new(),
        next_ttt: 1,
        deferred: Vec::new(),
        text_out: None,
        text_in: Vec::new(),
        closing: false,
    };
    tracing::debug!(initiator = %port.port_name(), session = o.session_id, "full feature phase");
    let mut last_rx = Instant::now();
    let mut ping: Option<(u32, Instant)> = None;
    let mut draining = false;
    let result: Result<(), IscsiError> = loop {
        if (draining || s.closing) && s.running() == 0 && s.deferred.is_empty() {
            break Ok(());
        }
        let nop_at = match ping {
            Some((_, sent)) => sent + cfg.nop_timeout,
            None => last_rx + cfg.nop_interval,
        };
        tokio::select! {
            _ = cancel.cancelled(), if !draining => {
                // Shutdown or reinstatement: take no new work, let running
                // commands finish and report.
                draining = true;
                s.drop_collecting(|_| true);
            }
            Some(c) = done_rx.recv() => {
                if let Err(e) = s.on_done(c).await {
                    break Err(e);
                }
            }
            msg = in_rx.recv(), if !draining && !s.closing => {
                last_rx = Instant::now();
                ping = None;
                match msg {
                    Some(Ok(pdu)) => {
                        if let Err(e) = s.on_pdu(pdu).await {
                            break Err(e);
                        }
                    }
                    Some(Err(WireError::Closed)) | None => break Ok(()),
                    Some(Err(WireError::DataDigest { bhs })) => {
                        let _ = s.reject(&bhs, RejectReason::DataDigestError).await;
                        break Err(IscsiError::Protocol("data digest error".into()));
                    }
                    Some(Err(e)) => break Err(e.into()),
                }
            }
            _ = tokio::time::sleep_until(nop_at), if !draining && !s.closing => {
                match ping {
                    Some(_) => break Err(IscsiError::Timeout("NOP-In ping")),
                    None => {
                        let ttt = s.ttt();
                        let mut b = Bhs::target(TargetOp::NopIn);
                        b.set_flags(0x80);
                        b.set_itt(RESERVED_TAG);
                        b.set_ttt(ttt);
                        if s.send(Outgoing::Pdu(Pdu::new(b), StatMode::Current)).await.is_err() {
                            break Err(IscsiError::Protocol("writer gone".into()));
                        }
                        ping = Some((ttt, Instant::now()));
                    }
                }
            }
        }
    };
    if let Err(e) = &result {
        tracing::info!(initiator = %port.port_name(), error = %e, "connection closed");
    }
    reader_task.abort();
    let _ = s.out.send(Outgoing::Close).await;
    drop(s.out);
    if let Some(lu) = &s.lu {
        lu.nexus_lost(&port);
    }
    let drained = s.tasks.is_empty();
    let _ = tokio::time::timeout(Duration::from_secs(10), writer_task).await;
    if !drained {
        tracing::debug!("connection closed with tasks still running");
    }
    drop(shutdown);
    result
}

/// Run one command, settling a mismatch between the expected transfer
/// length (EDTL, the data received) and the CDB's (SPDTL) as SAM-5 and FCP
/// describe: a plain WRITE transfers the smaller of the two when that is
/// whole blocks (underflow/overflow residual), otherwise the command is
/// refused; other commands report the residual and check their own data.
async fn run_command(
    lu: &LogicalUnit,
    nexus: &Nexus,
    mut cdb: Vec<u8>,
    mut data: Option<AlignedBuf>,
) -> (ScsiResponse, Option<Residual>) {
    let edtl = data.as_ref().map_or(0, |d| d.len() as u64);
    let bs = u64::from(lu.block_size());
    if opcodes::lookup_cdb(&cdb).is_none() {
        return (scsi::execute(lu, nexus, &cdb, data).await, None);
    }
    let spdtl = scsi::expected_data_out(&cdb, lu.block_size());
    if spdtl == edtl {
        return (scsi::execute(lu, nexus, &cdb, data).await, None);
    }
    let residual = if spdtl > edtl {
        Residual {
            overflow: true,
            count: (spdtl - edtl).min(u64::from(u32::MAX)) as u32,
        }
    } else {
        Residual {
            overflow: false,
            count: (edtl - spdtl) as u32,
        }
    };
    if cdb::is_plain_write(cdb[0]) {
        if edtl > spdtl {
            if let Some(d) = data.as_mut() {
                d.set_len(spdtl as usize);
            }
        } else if edtl.is_multiple_of(bs) {
            if edtl == 0 {
                return (ScsiResponse::good(), Some(residual));
            }
            cdb::set_transfer_len(&mut cdb, (edtl / bs) as u32);
        } else {
            let resp = ScsiResponse::check(
                Sense::invalid_field_in_information_unit(),
                lu.mode().d_sense,
            );
            return (resp, Some(residual));
        }
    }
    (scsi::execute(lu, nexus, &cdb, data).await, Some(residual))
}

enum Admit {
    Now,
    Hold,
    Drop,
}

impl Session {
    fn running(&self) -> usize {
        self.tasks
            .values()
            .filter(|t| matches!(t, TaskState::Running { .. }))
            .count()
    }

    /// Forget a task and its buffer charge.
    fn remove_task(&mut self, itt: u32) -> Option<TaskState> {
        if let Some(b) = self.charged.remove(&itt) {
            self.charged_total -= b;
        }
        self.tasks.remove(&itt)
    }

    /// Drop the selected tasks that are still collecting data (they were
    /// never acknowledged and can never complete).
    fn drop_collecting(&mut self, which: impl Fn(u32) -> bool) {
        let gone: Vec<u32> = self
            .tasks
            .iter()
            .filter(|(itt, t)| matches!(t, TaskState::Collecting(_)) && which(**itt))
            .map(|(itt, _)| *itt)
            .collect();
        for itt in gone {
            self.remove_task(itt);
        }
    }

    fn ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        t
    }

    async fn send(&self, o: Outgoing) -> Result<(), IscsiError> {
        self.out
            .send(o)
            .await
            .map_err(|_| IscsiError::Protocol("writer gone".into()))
    }

    /// Recompute MaxCmdSN from the free slots; it never shrinks.
    fn update_window(&mut self) {
        let outstanding = self.tasks.len() as u32;
        let free = self.cfg.cmd_window.saturating_sub(outstanding);
        let candidate = self.exp_cmd_sn.wrapping_add(free).wrapping_sub(1);
        if sn_lt(self.max_cmd_sn, candidate) {
            self.max_cmd_sn = candidate;
        }
        self.window
            .exp_cmd_sn
            .store(self.exp_cmd_sn, Ordering::Release);
        self.window
            .max_cmd_sn
            .store(self.max_cmd_sn, Ordering::Release);
    }

    fn admit(&mut self, bhs: &Bhs) -> Admit {
        if bhs.immediate() {
            return Admit::Now;
        }
        let sn = bhs.cmd_sn();
        if sn == self.exp_cmd_sn {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            self.update_window();
            Admit::Now
        } else if sn_lt(self.exp_cmd_sn, sn) && sn_le(sn, self.max_cmd_sn) {
            Admit::Hold
        } else {
            tracing::debug!(
                cmd_sn = sn,
                exp = self.exp_cmd_sn,
                max = self.max_cmd_sn,
                "CmdSN outside window: dropped"
            );
            Admit::Drop
        }
    }

    async fn reject(&self, bhs: &Bhs, reason: RejectReason) -> Result<(), IscsiError> {
        let mut b = Bhs::target(TargetOp::Reject);
        b.set_flags(0x80);
        b.0[2] = reason as u8;
        b.set_itt(RESERVED_TAG);
        self.send(Outgoing::Pdu(
            Pdu::with_data(b, bhs.0.to_vec()),
            StatMode::Advance,
        ))
        .await
    }

    async fn on_pdu(&mut self, first: Pdu) -> Result<(), IscsiError> {
        let mut queue = VecDeque::from([first]);
        while let Some(pdu) = queue.pop_front() {
            let op = InitiatorOp::from_code(pdu.bhs.opcode());
            let sequenced = matches!(
                op,
                Some(
                    InitiatorOp::ScsiCommand
                        | InitiatorOp::NopOut
                        | InitiatorOp::TaskMgmt
                        | InitiatorOp::Text
                        | InitiatorOp::Logout
                )
            );
            if sequenced {
                // A NOP-Out answering our ping carries no new CmdSN.
                let ping_reply = op == Some(InitiatorOp::NopOut) && pdu.bhs.itt() == RESERVED_TAG;
                if !ping_reply {
                    match self.admit(&pdu.bhs) {
                        Admit::Now => {}
                        Admit::Hold => {
                            if self.held.len() < self.cfg.cmd_window as usize {
                                self.held.insert(pdu.bhs.cmd_sn(), pdu);
                            }
                            continue;
                        }
                        Admit::Drop => continue,
                    }
                }
            }
            match op {
                Some(InitiatorOp::ScsiCommand) => self.scsi_command(pdu).await?,
                Some(InitiatorOp::DataOut) => self.data_out(pdu).await?,
                Some(InitiatorOp::NopOut) => self.nop_out(pdu).await?,
                Some(InitiatorOp::TaskMgmt) => self.task_mgmt(pdu).await?,
                Some(InitiatorOp::Text) => self.text(pdu).await?,
                Some(InitiatorOp::Logout) => self.logout(pdu).await?,
                Some(InitiatorOp::Snack) => {
                    self.reject(&pdu.bhs, RejectReason::CommandNotSupported)
                        .await?
                }
                Some(InitiatorOp::Login) => {
                    self.reject(&pdu.bhs, RejectReason::ProtocolError).await?;
                    return Err(IscsiError::Protocol(
                        "login PDU in full feature phase".into(),
                    ));
                }
                None => {
                    self.reject(&pdu.bhs, RejectReason::CommandNotSupported)
                        .await?
                }
            }
            if let Some(next) = self.held.remove(&self.exp_cmd_sn) {
                queue.push_back(next);
            }
        }
        Ok(())
    }

    async fn nop_out(&mut self, pdu: Pdu) -> Result<(), IscsiError> {
        if pdu.bhs.itt() == RESERVED_TAG {
            // Answer to our ping, or a pure CmdSN update.
            return Ok(());
        }
        let mut b = Bhs::target(TargetOp::NopIn);
        b.set_flags(0x80);
        b.set_lun_bytes(pdu.bhs.lun_bytes());
        b.set_itt(pdu.bhs.itt());
        b.set_ttt(RESERVED_TAG);
        let mut data = pdu.data;
        data.truncate(self.params.initiator_max_recv_data_segment_len as usize);
        self.send(Outgoing::Pdu(Pdu::with_data(b, data), StatMode::Advance))
            .await
    }

    /// Respond to a command without running it.
    async fn respond_now(
        &self,
        itt: u32,
        lun: [u8; 8],
        resp: ScsiResponse,
        read_edtl: Option<u32>,
        residual: Option<Residual>,
    ) -> Result<(), IscsiError> {
        let done = ScsiDone {
            itt,
            lun,
            resp,
            read_edtl,
            residual,
        };
        self.send(Outgoing::Scsi(Box::new(done))).await
    }

    async fn scsi_command(&mut self, pdu: Pdu) -> Result<(), IscsiError> {
        let b = &pdu.bhs;
        let itt = b.itt();
        let flags = b.flags();
        let (read, write, final_bit) = (flags & 0x40 != 0, flags & 0x20 != 0, flags & 0x80 != 0);
        let edtl = b.u32_at(20);
        let lun = b.lun_bytes();
        let mut cdb = b.0[32..48].to_vec();
        cdb.truncate(cdb::cdb_len(cdb[0]));
        let Some(lu) = self.lu.clone() else {
            self.reject(b, RejectReason::ProtocolError).await?;
            return Err(IscsiError::Protocol(
                "SCSI command in a discovery session".into(),
            ));
        };
        if self.tasks.contains_key(&itt) {
            return self.reject(b, RejectReason::TaskInProgress).await;
        }
        if b.immediate() && self.tasks.len() >= 2 * self.cfg.cmd_window as usize {
            return self.reject(b, RejectReason::ImmediateCommandReject).await;
        }
        let d_sense = lu.mode().d_sense;
        let read_edtl = read.then_some(edtl);
        if decode_lun(lun) != Some(0) {
            let resp = match cdb[0] {
                0x12 if cdb[1] & 0x01 == 0 => {
                    // Peripheral qualifier 3: no logical unit here.
                    let mut v = vec![0u8; 36];
                    v[0] = 0x7f;
                    v[2] = 0x06;
                    v[3] = 0x12;
                    v[4] = 31;
                    ScsiResponse::data_alloc(v, cdb::be16(&cdb[3..5]) as usize)
                }
                0xa0 => scsi::report_luns(&cdb).unwrap_or_else(|s| ScsiResponse::check(s, d_sense)),
                _ => ScsiResponse::check(Sense::lun_not_supported(), d_sense),
            };
            return self.respond_now(itt, lun, resp, read_edtl, None).await;
        }
        let need = u64::from(edtl)
            .max(scsi::transfer_bytes(&cdb, lu.block_size()))
            .min(scsi::TRANSFER_BYTES_MAX);
        if self.charged_total > 0 && self.charged_total + need > self.cfg.inflight_bytes_max {
            let resp = ScsiResponse::status(scsi::sense::STATUS_TASK_SET_FULL);
            return self.respond_now(itt, lun, resp, None, None).await;
        }
        let immediate = pdu.data.len() as u32;
        if !write || edtl == 0 {
            self.charged.insert(itt, need);
            self.charged_total += need;
            self.tasks
                .insert(itt, TaskState::Running { aborted: false });
            self.spawn(lu, itt, lun, cdb, None, read_edtl);
            return Ok(());
        }
        if u64::from(edtl) > scsi::TRANSFER_BYTES_MAX {
            let resp = ScsiResponse::check(Sense::invalid_field_in_cdb(0), d_sense);
            return self.respond_now(itt, lun, resp, read_edtl, None).await;
        }
        if immediate > 0
            && (!self.params.immediate_data
                || immediate > edtl
                || immediate > self.params.first_burst_len)
        {
            self.reject(b, RejectReason::ProtocolError).await?;
            return Err(IscsiError::Protocol(
                "immediate data past the negotiated limits".into(),
            ));
        }
        let mut buf = AlignedBuf::zeroed(edtl as usize);
        buf[..immediate as usize].copy_from_slice(&pdu.data);
        let unsolicited_end = if !final_bit && !self.params.initial_r2t {
            edtl.min(self.params.first_burst_len)
        } else {
            immediate
        };
        let task = WriteTask {
            lun,
            cdb,
            edtl,
            read,
            buf,
            received: immediate,
            unsolicited_end,
            data_sn: 0,
            r2t: None,
            next_r2t_sn: 0,
        };
        self.tasks
            .insert(itt, TaskState::Collecting(Box::new(task)));
        self.charged.insert(itt, need);
        self.charged_total += need;
        self.advance_write(itt).await
    }

    /// After data arrived (or at start): run the command when complete,
    /// otherwise solicit the next burst when nothing is outstanding.
    async fn advance_write(&mut self, itt: u32) -> Result<(), IscsiError> {
        let Some(TaskState::Collecting(t)) = self.tasks.get_mut(&itt) else {
            return Ok(());
        };
        if t.received == t.edtl {
            let Some(TaskState::Collecting(t)) = self.tasks.remove(&itt) else {
                return Ok(());
            };
            self.tasks
                .insert(itt, TaskState::Running { aborted: false });
            let lu = self
                .lu
                .clone()
                .ok_or_else(|| IscsiError::Protocol("no LU".into()))?;
            let read_edtl = t.read.then_some(t.edtl);
            self.spawn(lu, itt, t.lun, t.cdb, Some(t.buf), read_edtl);
            return Ok(());
        }
        if t.received < t.unsolicited_end || t.r2t.is_some() {
            return Ok(());
        }
        let offset = t.received;
        let len = (t.edtl - offset).min(self.params.max_burst_len);
        let r2t_sn = t.next_r2t_sn;
        t.next_r2t_sn += 1;
        t.data_sn = 0;
        let lun = t.lun;
        let ttt = self.ttt();
        if let Some(TaskState::Collecting(t)) = self.tasks.get_mut(&itt) {
            t.r2t = Some((ttt, offset + len));
        }
        let mut b = Bhs::target(TargetOp::R2t);
        b.set_flags(0x80);
        b.set_lun_bytes(lun);
        b.set_itt(itt);
        b.set_ttt(ttt);
        b.set_u32_at(36, r2t_sn);
        b.set_u32_at(40, offset);
        b.set_u32_at(44, len);
        self.send(Outgoing::Pdu(Pdu::new(b), StatMode::Current))
            .await
    }

    async fn data_out(&mut self, pdu: Pdu) -> Result<(), IscsiError> {
        let b = &pdu.bhs;
        let itt = b.itt();
        let Some(TaskState::Collecting(t)) = self.tasks.get_mut(&itt) else {
            // Data for a task that was aborted or answered early: drop it.
            return Ok(());
        };
        let ttt = b.ttt();
        let data_sn = b.u32_at(36);
        let offset = b.u32_at(40);
        let len = pdu.data.len() as u32;
        let end = offset.checked_add(len);
        let limit = if ttt == RESERVED_TAG {
            t.unsolicited_end
        } else {
            match t.r2t {
                Some((r2t_ttt, r2t_end)) if r2t_ttt == ttt => r2t_end,
                _ => 0,
            }
        };
        let in_bounds = offset == t.received && end.is_some_and(|e| e <= limit);
        if in_bounds && data_sn != t.data_sn {
            // A lost or reordered Data-Out: fail this command only; later
            // Data-Out PDUs for it find no task and are dropped.
            let lun = t.lun;
            self.remove_task(itt);
            self.update_window();
            let resp = ScsiResponse::check(Sense::data_phase_error(), false);
            return self.respond_now(itt, lun, resp, None, None).await;
        }
        if !in_bounds {
            let bhs = pdu.bhs.clone();
            self.reject(&bhs, RejectReason::ProtocolError).await?;
            return Err(IscsiError::Protocol(format!(
                "bad Data-Out: DataSN {data_sn} offset {offset} len {len} ttt {ttt:#x}"
            )));
        }
        t.buf[offset as usize..(offset + len) as usize].copy_from_slice(&pdu.data);
        t.received += len;
        t.data_sn = t.data_sn.wrapping_add(1);
        if ttt == RESERVED_TAG {
            if b.final_bit() || t.received == t.unsolicited_end {
                // The unsolicited sequence ended, possibly short.
                t.unsolicited_end = t.received;
                t.data_sn = 0;
            }
        } else if let Some((_, r2t_end)) = t.r2t
            && t.received == r2t_end
        {
            t.r2t = None;
        }
        self.advance_write(itt).await
    }

    fn spawn(
        &self,
        lu: Arc<LogicalUnit>,
        itt: u32,
        lun: [u8; 8],
        cdb: Vec<u8>,
        data: Option<AlignedBuf>,
        read_edtl: Option<u32>,
    ) {
        let nexus = self.nexus.clone();
        let done_tx = self.done_tx.clone();
        tokio::spawn(async move {
            let (resp, residual) = run_command(&lu, &nexus, cdb, data).await;
            let done = Box::new(ScsiDone {
                itt,
                lun,
                resp,
                read_edtl,
                residual,
            });
            let _ = done_tx.send(Completion { itt, done }).await;
        });
    }

    async fn on_done(&mut self, c: Completion) -> Result<(), IscsiError> {
        let aborted = matches!(
            self.remove_task(c.itt),
            Some(TaskState::Running { aborted: true })
        );
        self.update_window();
        if !aborted {
            self.send(Outgoing::Scsi(c.done)).await?;
        }
        let mut ready = Vec::new();
        for (i, d) in self.deferred.iter_mut().enumerate() {
            d.waiting.retain(|&t| t != c.itt);
            if d.waiting.is_empty() {
                ready.push(i);
            }
        }
        for i in ready.into_iter().rev() {
            let d = self.deferred.remove(i);
            self.send(Outgoing::Pdu(d.pdu, StatMode::Advance)).await?;
            if d.close_after {
                self.closing = true;
            }
        }
        Ok(())
    }

    /// Abort the tasks selected by `which`; returns the running ones still
    /// to finish.
    fn abort_tasks(&mut self, which: impl Fn(u32) -> bool) -> Vec<u32> {
        self.drop_collecting(&which);
        let mut waiting = Vec::new();
        for (itt, t) in self.tasks.iter_mut() {
            if let TaskState::Running { aborted } = t
                && which(*itt)
            {
                *aborted = true;
                waiting.push(*itt);
            }
        }
        self.update_window();
        waiting
    }

    /// Send `pdu` once the tasks in `waiting` finished.
    async fn respond_after(
        &mut self,
        waiting: Vec<u32>,
        pdu: Pdu,
        close_after: bool,
    ) -> Result<(), IscsiError> {
        if waiting.is_empty() {
            self.send(Outgoing::Pdu(pdu, StatMode::Advance)).await?;
            if close_after {
                self.closing = true;
            }
            return Ok(());
        }
        self.deferred.push(Deferred {
            waiting,
            pdu,
            close_after,
        });
        Ok(())
    }

    async fn task_mgmt(&mut self, pdu: Pdu) -> Result<(), IscsiError> {
        let b = &pdu.bhs;
        let function = b.flags() & 0x7f;
        let rtt = b.u32_at(20);
        let lun_ok = decode_lun(b.lun_bytes()) == Some(0);
        let mut r = Bhs::target(TargetOp::TaskMgmtResponse);
        r.set_flags(0x80);
        r.set_itt(b.itt());
        let (code, waiting, close_after) = match function {
            // ABORT TASK
            1 => {
                if self.tasks.contains_key(&rtt) {
                    (0, self.abort_tasks(|t| t == rtt), false)
                } else {
                    // Already answered (or never seen): task does not exist.
                    (1, Vec::new(), false)
                }
            }
            // ABORT TASK SET, CLEAR TASK SET
            2 | 4 => (
                if lun_ok { 0 } else { 2 },
                self.abort_tasks(|_| true),
                false,
            ),
            // LOGICAL UNIT RESET, TARGET WARM RESET, TARGET COLD RESET
            5..=7 => {
                if function == 5 && !lun_ok {
                    (2, Vec::new(), false)
                } else {
                    let waiting = self.abort_tasks(|_| true);
                    if let Some(lu) = &self.lu {
                        lu.reset();
                    }
                    (0, waiting, function == 7)
                }
            }
            // TASK REASSIGN: needs error recovery level 2.
            8 => (4, Vec::new(), false),
            _ => (5, Vec::new(), false),
        };
        r.0[2] = code;
        self.respond_after(waiting, Pdu::new(r), close_after).await
    }

    async fn logout(&mut self, pdu: Pdu) -> Result<(), IscsiError> {
        let reason = pdu.bhs.flags() & 0x7f;
        let mut r = Bhs::target(TargetOp::LogoutResponse);
        r.set_flags(0x80);
        r.set_itt(pdu.bhs.itt());
        if reason == 2 {
            // Connection recovery needs error recovery level 2.
            r.0[2] = 2;
            return self
                .send(Outgoing::Pdu(Pdu::new(r), StatMode::Advance))
                .await;
        }
        r.0[2] = 0;
        // Tasks still collecting data will never complete: drop them; let
        // running ones finish and report before the logout response.
        self.drop_collecting(|_| true);
        let waiting: Vec<u32> = self.tasks.keys().copied().collect();
        self.respond_after(waiting, Pdu::new(r), true).await
    }

    async fn text(&mut self, pdu: Pdu) -> Result<(), IscsiError> {
        let b = &pdu.bhs;
        let cont = b.flags() & 0x40 != 0;
        let ttt = b.ttt();
        let mut r = Bhs::target(TargetOp::TextResponse);
        r.set_lun_bytes(b.lun_bytes());
        r.set_itt(b.itt());
        if ttt != RESERVED_TAG {
            // The initiator asks for the rest of our previous response.
            let Some((want, rest)) = self.text_out.take() else {
                return self.reject(b, RejectReason::InvalidPduField).await;
            };
            if want != ttt {
                return self.reject(b, RejectReason::InvalidPduField).await;
            }
            return self.send_text(r, rest).await;
        }
        if self.text_in.len() + pdu.data.len() > TEXT_MAX {
            self.text_in.clear();
            return self.reject(b, RejectReason::ProtocolError).await;
        }
        self.text_in.extend_from_slice(&pdu.data);
        if cont {
            r.set_flags(0);
            r.set_ttt(self.ttt());
            return self
                .send(Outgoing::Pdu(Pdu::new(r), StatMode::Advance))
                .await;
        }
        let data = std::mem::take(&mut self.text_in);
        let keys = match text::parse(&data) {
            Ok(k) => k,
            Err(_) => return self.reject(b, RejectReason::ProtocolError).await,
        };
        let mut out = Vec::new();
        for (k, v) in &keys {
            if k == "SendTargets" {
                let own = self.lu.as_ref().map(|lu| lu.name.clone());
                let list =
                    discovery::send_targets(&self.registry, v, own.as_deref(), self.portal).await;
                out.extend(list);
            } else {
                out.push((k.clone(), "NotUnderstood".to_string()));
            }
        }
        self.send_text(r, text::encode(&out)).await
    }

    async fn send_text(&mut self, mut r: Bhs, mut body: Vec<u8>) -> Result<(), IscsiError> {
        let max = self.params.initiator_max_recv_data_segment_len as usize;
        if body.len() > max {
            let rest = body.split_off(max);
            let ttt = self.ttt();
            r.set_flags(0x40);
            r.set_ttt(ttt);
            self.text_out = Some((ttt, rest));
        } else {
            r.set_flags(0x80);
            r.set_ttt(RESERVED_TAG);
        }
        self.send(Outgoing::Pdu(Pdu::with_data(r, body), StatMode::Advance))
            .await
    }
}
