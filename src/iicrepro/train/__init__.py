"""Training: self-supervised pretraining, fine-tuning, checkpoints, seeding and devices."""
