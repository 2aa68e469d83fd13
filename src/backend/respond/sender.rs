//! What a request is owed, as types with `Drop`: `ResponseSender` (exactly one final response:
//! on drop a flags-only FINAL, or an error if nothing was sent) and `Job` (the unreleased
//! request: on drop its statistics are reported and it is released). Building responses is
//! `outputs`'s job, deciding when to send them the `Responder`'s.

use triton_api::{InstanceHandle, Request, ResponseFactory, TritonError};

use super::outputs::OutputTensor;

/// Sends a request's responses; exactly one of them is final, whatever happens.
pub struct ResponseSender {
    factory: ResponseFactory,
    num_sent: usize,
    final_sent: bool,
}

impl ResponseSender {
    /// Takes the request's response factory; the sender now owes the request its final
    /// response.
    pub fn new(factory: ResponseFactory) -> Self {
        ResponseSender {
            factory,
            num_sent: 0,
            final_sent: false,
        }
    }

    /// Sends one response of `outputs`; `final_flag` makes it the last. Fails after the final
    /// response, or when Triton refuses to build or send this one.
    pub fn send(&mut self, outputs: &[OutputTensor], final_flag: bool) -> Result<(), TritonError> {
        if self.final_sent {
            return Err(TritonError::internal("a response after the final one"));
        }
        let sent = (|| {
            let mut resp = self.factory.response()?;
            for o in outputs {
                resp.add_output(o.name, o.dtype, &o.shape, &o.data)?;
            }
            resp.send(final_flag, None)
        })();
        // Only a response that went out counts: after a failed final one, `Drop` still sends the
        // request its final error or flag (exactly one final response).
        if sent.is_ok() {
            self.final_sent = final_flag;
            self.num_sent += 1;
        }
        sent
    }

    /// Sends `error` as the final response (no-op if a final response went out already).
    pub fn send_error(&mut self, error: &TritonError) {
        if self.final_sent {
            return;
        }
        self.final_sent = true;
        self.num_sent += 1;
        let sent = self
            .factory
            .response()
            .and_then(|r| r.send(true, Some(error)));
        if let Err(e) = sent {
            triton_api::log::error(&format!("cannot send an error response ({error}): {e}"));
        }
    }

    /// Whether the client cancelled the request (polled every `CANCEL_POLL`); a failed query
    /// reads as not cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.factory.is_cancelled().unwrap_or(false)
    }

    /// Whether the final response (or final error) went out: nothing more may be sent.
    pub fn final_sent(&self) -> bool {
        self.final_sent
    }
}

impl Drop for ResponseSender {
    fn drop(&mut self) {
        if self.final_sent {
            return;
        }
        if self.num_sent == 0 {
            self.send_error(&TritonError::internal(
                "the request ended without a response",
            ));
        } else if let Err(e) = self.factory.send_flags(true) {
            triton_api::log::error(&format!("cannot send the final flag: {e}"));
        }
    }
}

/// A request the backend owns until it is answered: on drop, the final response is ensured,
/// statistics are reported and the request is released (in that order).
pub struct Job {
    /// The request's responses; if none was final when the job drops, an error is sent.
    pub sender: ResponseSender,
    request: Option<Request>,
    instance: InstanceHandle,
    exec_start_ns: u64,
    compute_start_ns: u64,
    pub(super) success: bool,
}

impl Job {
    /// Takes ownership of an unreleased request. `exec_start_ns` (`triton_api::now_ns`) is when
    /// its Execute call started, for the statistics reported on drop.
    pub fn new(
        request: Request,
        sender: ResponseSender,
        instance: InstanceHandle,
        exec_start_ns: u64,
    ) -> Self {
        Job {
            sender,
            request: Some(request),
            instance,
            exec_start_ns,
            compute_start_ns: 0,
            success: false,
        }
    }

    /// Reads from the (unreleased) request.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Request) -> Result<T, TritonError>,
    ) -> Result<T, TritonError> {
        match &self.request {
            Some(r) => f(r),
            None => Err(TritonError::internal("the request was already released")),
        }
    }

    /// The id of the instance whose Execute accepted the request (`Responder::drain` selects
    /// by it).
    pub fn instance_id(&self) -> usize {
        self.instance.id()
    }

    /// Ends the request with an error response.
    pub fn fail(mut self, error: &TritonError) {
        self.sender.send_error(error);
        self.success = false;
    }

    pub(super) fn mark_compute_start(&mut self) {
        if self.compute_start_ns == 0 {
            self.compute_start_ns = triton_api::now_ns();
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if !self.sender.final_sent() {
            self.sender.send_error(&TritonError::internal(
                "the request was dropped before it completed",
            ));
            self.success = false;
        }
        let Some(request) = self.request.take() else {
            return;
        };
        let end = triton_api::now_ns();
        let compute_start = if self.compute_start_ns == 0 {
            end
        } else {
            self.compute_start_ns
        };
        if let Err(e) = self.instance.report_statistics(
            &request,
            self.success,
            self.exec_start_ns,
            compute_start,
            end,
            end,
        ) {
            triton_api::log::warn(&format!("cannot report request statistics: {e}"));
        }
        if let Err(e) = request.release() {
            triton_api::log::error(&format!("cannot release a request: {e}"));
        }
    }
}
