"""Training: LightningModules (teacher, Diffusion Forcing), data modules, run-folder handling."""
