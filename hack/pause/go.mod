module scangate.dev/pause

go 1.22
