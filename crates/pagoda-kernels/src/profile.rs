//! Where a forward pass spends its time, op by op, when `PAGODA_PROFILE` asks for it:
//! `host` times each op's call as the caller sees it (launch work only, on a GPU), `device`
//! synchronises the device after each op so its time includes the kernels. Off by default; a
//! disabled profiler costs one relaxed load per op.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use pagoda_tensor::{CudaDevice, Device};

/// 0: not read yet, 1: off, 2: host, 3: device.
static MODE: AtomicU8 = AtomicU8::new(0);
static TOTALS: Mutex<BTreeMap<&'static str, (u64, f64)>> = Mutex::new(BTreeMap::new());

fn mode() -> u8 {
    match MODE.load(Ordering::Relaxed) {
        0 => {
            let mode = match std::env::var("PAGODA_PROFILE").as_deref() {
                Ok("host") => 2,
                Ok("device") => 3,
                _ => 1,
            };
            MODE.store(mode, Ordering::Relaxed);
            mode
        }
        mode => mode,
    }
}

/// Times one op until dropped.
pub struct OpTimer {
    op: &'static str,
    device: Device,
    start: Option<Instant>,
}

impl OpTimer {
    pub fn start(op: &'static str, device: Device) -> Self {
        let start = (mode() > 1).then(Instant::now);
        Self { op, device, start }
    }
}

impl Drop for OpTimer {
    fn drop(&mut self) {
        let Some(start) = self.start else { return };
        if mode() == 3
            && let Device::Cuda(ordinal) = self.device
            && let Ok(device) = CudaDevice::get(ordinal)
        {
            // A failed synchronisation surfaces at the op's next use; the profile just ends early.
            let _ = device.synchronize();
        }
        let mut totals = TOTALS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = totals.entry(self.op).or_insert((0, 0.0));
        entry.0 += 1;
        entry.1 += start.elapsed().as_secs_f64();
    }
}

/// The totals so far as `(op, calls, seconds)`, largest first; empty when profiling is off.
pub fn report() -> Vec<(&'static str, u64, f64)> {
    let totals = TOTALS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut rows: Vec<_> = totals.iter().map(|(op, (n, s))| (*op, *n, *s)).collect();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    rows
}

/// Forgets the totals (after a warm-up, say).
pub fn reset() {
    TOTALS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clear();
}
