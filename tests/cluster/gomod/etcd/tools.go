//go:build tools

// Package tools records the etcd server this module builds, so `go mod tidy` keeps it pinned by go.sum.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
)
