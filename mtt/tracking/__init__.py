"""What a run leaves behind: the MLflow run and sweep parents (runs), the journal that ships to
the store (journal, sync), checkpoints to resume from (checkpoint), the records beside a run
(records), a lab's tracking server (server) and the UI's address (ui)."""
