//! io_uring backend (in progress).

use std::net::SocketAddr;
use std::time::Duration;

use super::{Backend, ConnId, Event, IoConfig, IoError, IoStats, ShardIo};

/// The io_uring backend.
pub struct UringIo {
    stats: IoStats,
    local: SocketAddr,
}

impl UringIo {
    /// Sets up the ring and the sockets.
    pub fn new(_config: &IoConfig) -> Result<Self, IoError> {
        Err(IoError::UringRefused(std::io::Error::from_raw_os_error(
            libc::ENOSYS,
        )))
    }
}

impl ShardIo for UringIo {
    fn poll(
        &mut self,
        _: Option<Duration>,
        _: &mut dyn FnMut(Event<'_>),
    ) -> Result<usize, IoError> {
        Ok(0)
    }
    fn send_client_udp(&mut self, _: SocketAddr, _: &[u8]) {}
    fn send_client_tcp(&mut self, _: ConnId, _: &[u8]) {}
    fn send_upstream_udp(&mut self, _: u16, _: &[u8]) {}
    fn send_upstream_tcp(&mut self, _: &[u8]) {}
    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }
    fn backend(&self) -> Backend {
        Backend::Uring
    }
    fn stats(&self) -> &IoStats {
        &self.stats
    }
    fn local_addr(&self) -> SocketAddr {
        self.local
    }
    fn upstream_local_addr(&self, _: u16) -> Option<SocketAddr> {
        None
    }
}
