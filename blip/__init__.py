"""blip-pipeline: BLIP pretraining, CapFilt, fine-tuning and evaluation."""
