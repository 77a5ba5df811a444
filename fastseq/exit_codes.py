"""The exit codes of every ``fastseq`` command (``fastseq --help`` and the README list them)."""

OK = 0
BUG_EXIT = 1           # an unexpected exception: a bug in fastseq
USAGE_EXIT = 2         # a user error: the message says what to change
NOTHING_FITS_EXIT = 3  # `fastseq plan`: no configuration fits the budget (an answer, not an error)
NOTHING_TRAINED_EXIT = 4  # `fastseq run`: no round aggregated a client update (the reasons are printed)
INTERRUPT_EXIT = 130   # Ctrl-C (128 + SIGINT), as shells report it

EXIT_CODES = f"""exit codes:
  {OK}    success
  {BUG_EXIT}    internal error: a bug in fastseq (the traceback is printed; please report it)
  {USAGE_EXIT}    user error: one line on stderr says what to change (flags, config, paths, a run
       directory another process is writing, a resume that does not match its run)
  {NOTHING_FITS_EXIT}    fastseq plan: nothing fits the budget (the closest configuration is printed);
       fastseq run / plan --fleet: a fleet tier that nothing fits (named with its shortfall)
  {NOTHING_TRAINED_EXIT}    fastseq run: no round aggregated a client update (each client's reason is printed)
  {INTERRUPT_EXIT}  interrupted (Ctrl-C); fastseq run prints the command that continues the run"""
