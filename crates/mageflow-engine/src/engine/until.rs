//! What a waiter waits for ([`Until`]). Alone, at the bottom, because `Error::WaitTimeout`
//! carries one too.

/// What [`Handle::wait_for`] waits for.
///
/// [`Handle::wait_for`]: crate::Handle::wait_for
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Until {
    /// The workflow is finished ([`Workflow::is_finished`]): what [`Handle::wait`] waits for.
    ///
    /// [`Handle::wait`]: crate::Handle::wait
    /// [`Workflow::is_finished`]: mageflow_core::Workflow::is_finished
    Finished,
    /// Finished, or nothing in it can move without a user ([`Workflow::is_settled`]): every
    /// signature left is suspended, interrupted, waiting under a paused one, or waiting for
    /// items or the close of an open swarm. Work the start-up recovery held whole
    /// ([`AutoResume`]) counts as settled too.
    ///
    /// [`AutoResume`]: crate::AutoResume
    /// [`Workflow::is_settled`]: mageflow_core::Workflow::is_settled
    Settled,
}

impl std::fmt::Display for Until {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Until::Finished => "finished",
            Until::Settled => "settled",
        })
    }
}
