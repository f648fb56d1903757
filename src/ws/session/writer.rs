//! The writing half of a session: the outbox drained into the socket (one flush per
//! wake-up, under `--write-timeout`), the gathering of frames before that write when the
//! broker is busy (`--coalesce-yields`), replies that never overtake queued events, close
//! frames and their codes, and the delivery metrics.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite;

use super::{Flow, Session, Socket};
use crate::conflate::Due;
use crate::metrics::CloseReason;
use crate::outbox::{Drained, Frame, Live};
use crate::protocol::{close, ProtocolError};

/// How long a closing frame may take to go out before the socket is dropped anyway.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Frames a busy session gathers before it stops yielding. A write of this many (~10 KB of
/// typical events) already amortizes the wake-up and the `send`; holding more back only adds
/// latency and eats into the outbox's slack for a slow reader (a session whose last write
/// carried this many or more does not yield at all: it is batching on its own).
const GATHER_FRAMES: usize = 32;

/// What a flush of the outbox did.
pub(super) enum Flushed {
    /// This many frames were written (possibly none).
    Frames(usize),
    /// The outbox overflowed: close the connection as a slow consumer.
    Overflowed,
}

/// Why a write failed.
pub(super) enum WriteError {
    /// The socket is gone.
    Socket,
    /// The client did not take the bytes within the write timeout.
    Timeout,
}

impl Session {
    /// The outbox has frames (or overflowed): write them, or close a slow consumer.
    pub(super) async fn on_outbox<S: Socket>(&mut self, socket: &mut S) -> Flow {
        if self.busy {
            self.gather().await;
        }
        match self.flush_outbox(socket, false).await {
            Ok(Flushed::Frames(frames)) => {
                self.busy = frames > 1 && frames < GATHER_FRAMES;
                Flow::Continue
            }
            Ok(Flushed::Overflowed) | Err(WriteError::Timeout) => {
                let reason = self.outbox.slow_reason();
                tracing::info!(peer = %self.peer, reason, "closing slow consumer");
                self.close_with(socket, Some((close::SLOW_CONSUMER, reason)))
                    .await;
                Flow::Close(CloseReason::SlowConsumer)
            }
            Err(WriteError::Socket) => Flow::Close(CloseReason::Error),
        }
    }

    /// Lets the tasks already queued on this worker run (the hub's dispatch of other
    /// concurrent publishes among them) before writing, so that one wake-up and one `send`
    /// carry the frames they queue too. Called only when the previous write carried several
    /// frames, but fewer than [`GATHER_FRAMES`]: a wake-up that found a lone frame means the
    /// broker is not busy, and the next one is written at once. It stops as soon as a yield
    /// brought nothing new, after `--coalesce-yields` yields, once [`GATHER_FRAMES`] are
    /// queued, or once the outbox is half full (waiting longer would risk a slow-consumer
    /// close). A yield waits for no timer: under load it costs one turn of
    /// the scheduler's queue, which is exactly the time in which the frames it gathers are
    /// queued.
    async fn gather(&self) {
        let Some(mut queued) = self.outbox.below_half().filter(|&n| n < GATHER_FRAMES) else {
            return;
        };
        for _ in 0..self.state.config.coalesce_yields {
            tokio::task::yield_now().await;
            match self.outbox.below_half() {
                Some(now) if now > queued && now < GATHER_FRAMES => queued = now,
                _ => return,
            }
        }
    }

    /// Writes everything queued (`everything`: the slots a `max_rate` holds back too, else
    /// only those due), then flushes once. The batch lives only for the write, so an idle
    /// connection holds no frame buffer.
    pub(super) async fn flush_outbox<S: Socket>(
        &self,
        socket: &mut S,
        everything: bool,
    ) -> Result<Flushed, WriteError> {
        let mut batch: Vec<Frame> = Vec::new();
        // Positions for the checkpoints owed, read before the drain (see `drain_with`).
        let positions: Vec<_> = self
            .outbox
            .checkpoint_collections()
            .into_iter()
            .filter_map(|c| {
                let at = self.state.subscriptions.position(&c)?;
                Some((c, at))
            })
            .collect();
        let now = std::time::Instant::now();
        let due = match everything {
            true => Due::All(now),
            false => Due::By(now),
        };
        match self.outbox.drain_with(&mut batch, &positions, due) {
            Drained::Overflowed => return Ok(Flushed::Overflowed),
            Drained::Frames { rate_unheld: 0 } => {}
            Drained::Frames { rate_unheld } => self
                .state
                .metrics
                .conflation_rate_unheld
                .inc_by(rate_unheld as u64),
        }
        if batch.is_empty() {
            return Ok(Flushed::Frames(0));
        }
        let frames = batch.len();
        let write_timeout = self.state.config.write_timeout;
        let mut bytes = 0usize;
        // The stamps are kept aside so the frames' text can be moved into the socket rather
        // than cloned (a clone is an atomic increment on a count every receiver shares).
        let stamps: Vec<Live> = batch.iter().filter_map(|f| f.live).collect();
        let write = async {
            for frame in batch {
                if frame.live.is_some() {
                    bytes += frame.text.len();
                }
                socket
                    .feed(Message::Text(frame.text))
                    .await
                    .map_err(|_| WriteError::Socket)?;
            }
            socket.flush().await.map_err(|_| WriteError::Socket)
        };
        match tokio::time::timeout(write_timeout, write).await {
            Ok(result) => result?,
            Err(_) => {
                self.outbox.mark_slow();
                return Err(WriteError::Timeout);
            }
        }
        let metrics = &self.state.metrics;
        let now = std::time::Instant::now();
        let live = stamps.len() as u64;
        // Local histograms: one atomic merge per flush instead of per frame.
        let delivery_latency = metrics.delivery_latency.local();
        let outbox_to_socket = metrics.outbox_to_socket.local();
        for stamp in &stamps {
            delivery_latency.observe(now.saturating_duration_since(stamp.received).as_secs_f64());
            outbox_to_socket.observe(now.saturating_duration_since(stamp.queued).as_secs_f64());
        }
        delivery_latency.flush();
        outbox_to_socket.flush();
        metrics.deliveries.inc_by(live);
        metrics.delivered_bytes.inc_by(bytes as u64);
        metrics.frames_per_write.observe(frames as f64);
        Ok(Flushed::Frames(frames))
    }

    /// Writes a reply. Frames the hub queued before it go out first, so a reply never
    /// overtakes events that happened before the request (no event of a subscription after
    /// its `unsubscribe` ack or after the `init` of the subscription replacing it).
    pub(super) async fn send<S: Socket>(
        &self,
        socket: &mut S,
        text: Utf8Bytes,
    ) -> Result<(), WriteError> {
        // An overflow found here is left to the loop: the outbox keeps it and its wake-up.
        self.flush_outbox(socket, false).await?;
        let result = tokio::time::timeout(
            self.state.config.write_timeout,
            socket.send(Message::Text(text)),
        )
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(WriteError::Socket),
            Err(_) => {
                self.outbox.mark_slow();
                Err(WriteError::Timeout)
            }
        }
    }

    pub(super) async fn send_error<S: Socket>(
        &self,
        socket: &mut S,
        error: &ProtocolError,
    ) -> Result<(), WriteError> {
        self.state.metrics.protocol_error(error.code);
        self.send(socket, error.to_frame().into()).await
    }

    pub(super) async fn reply<S: Socket>(&self, socket: &mut S, text: String) -> Flow {
        match self.send(socket, text.into()).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close(CloseReason::Error),
        }
    }

    pub(super) async fn reply_error<S: Socket>(
        &self,
        socket: &mut S,
        error: &ProtocolError,
    ) -> Flow {
        match self.send_error(socket, error).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close(CloseReason::Error),
        }
    }

    /// Sends a close frame (`None`: without a status code, as Directus does) and gives it a
    /// moment to leave.
    pub(super) async fn close_with<S: Socket>(
        &self,
        socket: &mut S,
        frame: Option<(u16, &'static str)>,
    ) {
        let frame = frame.map(|(code, reason)| CloseFrame {
            code,
            reason: reason.into(),
        });
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, socket.send(Message::Close(frame))).await;
    }

    /// The drain's close (see [`crate::shutdown`]): the resume position is read first, then
    /// everything queued (at least every event up to that position) is written out, then
    /// `1001` tells the client to reconnect elsewhere and where to resume.
    pub(super) async fn close_for_shutdown<S: Socket>(&self, socket: &mut S) -> CloseReason {
        let position = self
            .state
            .subscriptions
            .resume_position(self.subs.iter().map(|s| s.collection()));
        // Slots held back by a `max_rate` too: the resume position covers them.
        match self.flush_outbox(socket, true).await {
            Ok(Flushed::Frames(_)) => {}
            Ok(Flushed::Overflowed) | Err(WriteError::Timeout) => {
                let reason = self.outbox.slow_reason();
                self.close_with(socket, Some((close::SLOW_CONSUMER, reason)))
                    .await;
                return CloseReason::SlowConsumer;
            }
            Err(WriteError::Socket) => return CloseReason::Error,
        }
        let frame = CloseFrame {
            code: close::GOING_AWAY,
            reason: crate::shutdown::close_reason(position.as_ref()).into(),
        };
        let _ = tokio::time::timeout(
            CLOSE_WRITE_TIMEOUT,
            socket.send(Message::Close(Some(frame))),
        )
        .await;
        CloseReason::Shutdown
    }

    /// The client closed: the socket has queued the answering close frame (same code, RFC
    /// 6455 §5.5.1); give it a moment to leave instead of dropping the connection under it.
    pub(super) async fn answer_close<S: Socket>(&self, socket: &mut S) {
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, socket.flush()).await;
    }

    /// The socket refused an inbound message: over the frame limit (1009), or a text frame
    /// that is not UTF-8 (1007, RFC 6455 §8.1); anything else has ended the connection.
    pub(super) async fn on_socket_error<S: Socket>(
        &self,
        socket: &mut S,
        error: axum::Error,
    ) -> Flow {
        let inner = error.into_inner();
        match inner.downcast_ref::<tungstenite::Error>() {
            Some(tungstenite::Error::Capacity(_)) => {
                tracing::debug!(peer = %self.peer, "inbound message over the frame limit");
                self.close_with(socket, Some((close::TOO_BIG, "message too big")))
                    .await;
                Flow::Close(CloseReason::FrameTooBig)
            }
            Some(tungstenite::Error::Utf8(_)) => {
                tracing::debug!(peer = %self.peer, "text frame with invalid UTF-8");
                self.close_with(
                    socket,
                    Some((close::INVALID_PAYLOAD, "invalid UTF-8 in a text frame")),
                )
                .await;
                Flow::Close(CloseReason::InvalidPayload)
            }
            _ => {
                tracing::debug!(peer = %self.peer, error = %inner, "socket error");
                Flow::Close(CloseReason::Client)
            }
        }
    }
}
