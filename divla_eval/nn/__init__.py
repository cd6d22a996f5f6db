"""Neural-network pieces shared by the learned policies (DiVLA and the baselines). Importing this
package imports torch, so the harness modules never import it at top level."""
