"""Background jobs: the job protocol and manager, the worker process, the job kinds, following a job."""
