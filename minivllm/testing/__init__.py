"""What tests and benchmarks build without downloading anything: seeded random-weight checkpoints
in real models' shapes (random_checkpoint)."""
