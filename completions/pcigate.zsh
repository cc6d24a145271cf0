
#compdef pcigate

_pcigate_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _PCIGATE_COMPLETE=complete_zsh pcigate)
}

compdef _pcigate_completion pcigate

