"""The ground floor: settings, schema, errors, the artifact and version store, the build
lock and the version layout. It imports nothing else of this project, so every other
package (features, training, serving, orchestration) may build on it."""
