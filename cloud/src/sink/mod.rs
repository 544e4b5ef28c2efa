pub mod keys;
pub mod parquet;
pub mod state;
