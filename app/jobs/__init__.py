"""Background work: submitting tasks, downloading clips, reconciling lost callbacks."""
