"""One module per verb group. Only typer is imported at module level: everything else inside the commands."""
