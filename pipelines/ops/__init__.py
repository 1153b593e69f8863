"""Operations: Ray Jobs submission, schedules (cron, Kubernetes manifests) and the run lock."""
