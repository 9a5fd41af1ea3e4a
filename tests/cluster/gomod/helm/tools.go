//go:build tools

// Package tools records the helm command this module builds, so `go mod tidy` keeps it pinned by go.sum.
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
