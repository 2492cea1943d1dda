"""Training: the session loop, checkpoints, guards, reports, the memory planner, schedules."""
