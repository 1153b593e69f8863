"""raygpt's Ray runtime: data prep (Ray Data), training (Ray Train + DeepSpeed), batch generation
(Ray Data), serving (Ray Serve) and operations (Ray Jobs, schedules). gptcore sits underneath."""
