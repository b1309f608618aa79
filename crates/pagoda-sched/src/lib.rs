//! Continuous-batching scheduler: decides which sequences run in each engine step under the
//! `max_num_seqs`, `max_batch_tokens` and free-block budgets. Pure logic, no tensors.
//!
//! Not implemented yet: the engine currently runs requests one after another.
