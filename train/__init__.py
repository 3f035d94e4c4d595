"""twinray.train: self-supervised pretraining (the methods, their losses, the step, the loop, checkpoints) and what
is done with a backbone afterwards (fine-tuning, linear probes, scans, Grad-CAM, exports, embeddings, audits)."""
