//! A long-lived thread that starts sandboxes.
//!
//! The parent-death signal of a sandbox follows the *thread* that cloned it: a sandbox
//! started from a pool thread that later ends (as tokio's blocking threads do when idle)
//! would be killed with it. A [`Worker`] is one thread that lives as long as its owner and
//! runs the spawns handed to it, one at a time, from a bounded queue; when it ends, every
//! sandbox it started is killed, which is the point: the daemon is gone.

use std::sync::mpsc::{Receiver, SyncSender};

type Job = Box<dyn FnOnce() + Send>;

/// The thread and its queue (see the module doc).
#[derive(Debug, Clone)]
pub struct Worker {
    jobs: SyncSender<Job>,
}

/// The worker thread is gone (it could not be started, or it panicked).
#[derive(Debug, thiserror::Error)]
#[error("The sandbox worker thread is gone")]
pub struct WorkerGone;

impl Worker {
    /// Starts a worker thread called `name` whose queue holds `queue` jobs.
    pub fn start(name: &str, queue: usize) -> std::io::Result<Worker> {
        let (jobs, receiver) = std::sync::mpsc::sync_channel::<Job>(queue);
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || serve(receiver))?;
        Ok(Worker { jobs })
    }

    /// Queues `job`; waits for room while the queue is full (async callers run this on a
    /// blocking thread).
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> Result<(), WorkerGone> {
        self.jobs.send(Box::new(job)).map_err(|_| WorkerGone)
    }
}

fn serve(jobs: Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        // On the daemon's main thread when it clones every sandbox (crate::parent).
        crate::parent::run(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_jobs_in_order_on_one_thread() {
        let worker = Worker::start("test-worker", 4).expect("worker");
        let (send, receive) = std::sync::mpsc::channel();
        for n in 0..3 {
            let send = send.clone();
            worker
                .submit(move || {
                    let name = std::thread::current().name().map(str::to_owned);
                    send.send((n, name)).expect("send");
                })
                .expect("submitted");
        }
        let got: Vec<_> = (0..3).map(|_| receive.recv().expect("ran")).collect();
        assert_eq!(
            got,
            (0..3)
                .map(|n| (n, Some("test-worker".to_owned())))
                .collect::<Vec<_>>()
        );
    }
}
