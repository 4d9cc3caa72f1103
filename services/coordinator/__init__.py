"""JobService: the front door. Plans a job, runs it on the services, persists its state."""
