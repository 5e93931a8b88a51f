"""Training: self-supervised pretraining, fine-tuning, and running them as torchrun jobs (DDP)."""
