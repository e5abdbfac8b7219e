"""What a run leaves on disk and how it is shown: the run folder, file writing, tables,
accounting, the comparison's reports, the HTML report and the progress line."""
