"""Lightning training pieces: the LightningModule, the DataModule, LoRA recovery and run reports."""
